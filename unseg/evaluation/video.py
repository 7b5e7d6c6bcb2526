"""Semi-supervised video object segmentation by label propagation, and the DAVIS J / F measures.

CrOC evaluates dense features on DAVIS-2017 val by propagating the first frame's GT labels with
nearest neighbours in feature space (CrOC project page; no official code, reference.md §2.4 item 8).
The propagation here follows DINO's ``eval_video_segmentation.py`` (after Jabri et al. / UVC):

- features of every frame are L2-normalised; the context of frame t is the first frame (with its GT
  labels, one-hot at feature resolution) plus the ``n_last_frames`` previous frames (with their
  *soft* propagated labels);
- affinity of a target token i to a context token j: exp(zᵢ·zⱼ / T), kept only when j lies in the
  square spatial window |Δrow|, |Δcol| ≤ ``neighborhood`` around i;
- for each target token, the top-k affinities over all context tokens together are kept (ties with
  the k-th value kept too) and normalised to sum 1 (a softmax over the top-k);
- soft labels of t = Σⱼ wᵢⱼ labelsⱼ; for the output they are bilinearly upsampled to the mask size,
  each channel min-max normalised (``norm_mask``), and the argmax taken.
DINO hard-codes T = 0.1 (``/ 0.1``), topk 5, 7 previous frames, neighbourhood 12.
Differences, all geometric and ≤ 1 px: the first mask is downsampled with ``nearest-exact`` (PIL's
nearest rule) straight to the feature grid, and the soft labels are upsampled bilinearly straight to the
mask size (DINO: bilinear ×patch size, then PIL-nearest to the original size). A constant channel is
left as is by ``norm_mask`` (DINO divides by zero there).

J and F follow the official ``davis2017-evaluation`` code (``metrics.py``, ``evaluation.py``):
J = |P∩G| / |P∪G| (1 when both are empty); F = boundary F-measure where boundaries come from
``_seg2bmap`` and are matched within a disk of radius ⌈bound_th · ‖(H, W)‖⌉ px (bound_th ≥ 1: that many
px) by ``cv2.dilate``. In the semi-supervised task the first AND last frames are left out, objects are
the ids 1..max(first GT frame), void pixels (255) count as background (the official loader zeroes them
before its per-object masks), and a dataset score is the mean over all objects of all sequences;
J&F = (J + F) / 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unseg.data.images import read_image
from unseg.errors import UserError

# ---------------------------------------------------------------- DAVIS layout


@dataclass(frozen=True)
class DavisSequence:
    """One sequence: frame paths in temporal order and the matching annotation paths (None if absent)."""

    name: str
    frames: tuple[Path, ...]
    annotations: tuple[Path | None, ...]


def read_davis_sequences(
    root: str | Path, resolution: str = "480p", split_file: str | None = "ImageSets/2017/val.txt"
) -> list[DavisSequence]:
    """Sequences of a DAVIS-layout folder: ``JPEGImages/<resolution>/<seq>/*.jpg|png`` and
    ``Annotations/<resolution>/<seq>/<frame>.png``. ``split_file`` (relative to ``root``) lists the
    sequences to use; when it is ``None`` or missing, every folder under ``JPEGImages/<resolution>`` is used.
    The first frame of every sequence must have an annotation."""
    root = Path(root)
    image_dir = root / "JPEGImages" / resolution
    if not image_dir.is_dir():
        raise UserError(f"DAVIS folder {root} has no JPEGImages/{resolution}")
    split_path = root / split_file if split_file else None
    if split_path is not None and split_path.is_file():
        names = [line.strip() for line in split_path.read_text().splitlines() if line.strip()]
    else:
        names = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
    sequences = []
    for name in names:
        seq_dir = image_dir / name
        if not seq_dir.is_dir():
            raise UserError(f"DAVIS sequence {name!r} listed in {split_path} has no folder {seq_dir}")
        frames = tuple(sorted(p for p in seq_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
        if not frames:
            raise UserError(f"DAVIS sequence folder {seq_dir} holds no .jpg/.png frames")
        ann_dir = root / "Annotations" / resolution / name
        anns = tuple((ann_dir / (f.stem + ".png")) if (ann_dir / (f.stem + ".png")).is_file() else None for f in frames)
        if anns[0] is None:
            raise UserError(f"DAVIS sequence {name!r}: first frame {frames[0].name} has no annotation in {ann_dir}")
        sequences.append(DavisSequence(name, frames, anns))
    return sequences


def read_frame(path: str | Path) -> np.ndarray:
    """RGB frame as uint8 (H, W, 3), read by the pipeline's one image reader."""
    return read_image(path)


def read_annotation(path: str | Path) -> np.ndarray:
    """Object-id map (H, W) int64 from a palette (mode P) or grey-level index PNG."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise UserError(f"annotation {path} is a {im.mode} image; expected a palette or index PNG")
        return np.asarray(im).astype(np.int64)


# ---------------------------------------------------------------- propagation


def neighbourhood_mask(h: int, w: int, radius: int) -> torch.Tensor:
    """(h·w, h·w) bool: token i = (r, c) may take labels from token j = (r', c') iff |r−r'| ≤ radius and
    |c−c'| ≤ radius (DINO ``restrict_neighborhood``; row-major token order). radius ≤ 0: no restriction."""
    if radius <= 0:
        return torch.ones(h * w, h * w, dtype=torch.bool)
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)


def propagation_weights(sim: torch.Tensor, valid: torch.Tensor, topk: int, temperature: float) -> torch.Tensor:
    """Row-stochastic (N, M) weights from similarities ``sim`` (N targets, M context tokens).

    w_ij ∝ exp(sim_ij / T) for valid j whose value reaches the row's k-th largest valid value (ties kept),
    0 otherwise; rows sum to 1. Equals DINO's ``exp(aff/0.1)·mask → topk → zero the rest → normalise``
    (invalid entries there are exactly 0, so they never outrank a valid one)."""
    logits = (sim / temperature).masked_fill(~valid, float("-inf"))
    k = min(topk, logits.shape[1])
    kth = logits.topk(k, dim=1).values[:, -1:]
    keep = valid & (logits >= kth)
    logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=1)


def _soft_to_mask(soft: torch.Tensor, out_size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) soft labels → (H, W) int64: bilinear upsampling, channel min-max (``norm_mask``), argmax."""
    up = F.interpolate(soft[None], size=out_size, mode="bilinear", align_corners=False)[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    scale = torch.where((hi > 0) & (hi > lo), hi - lo, torch.ones_like(hi))
    shift = torch.where((hi > 0) & (hi > lo), lo, torch.zeros_like(lo))
    return ((up - shift) / scale).argmax(0).numpy().astype(np.int64)


def _first_frame_labels(first_mask: np.ndarray, grid: tuple[int, int], void: int) -> torch.Tensor:
    """(H, W) ids → (h·w, C) one-hot at feature resolution (PIL-style nearest), C = max id + 1, void → 0."""
    ids = torch.as_tensor(np.where(first_mask == void, 0, first_mask).astype(np.int64))
    small = F.interpolate(ids[None, None].double(), size=grid, mode="nearest-exact")[0, 0].long()
    return F.one_hot(small.reshape(-1), int(ids.max()) + 1).float()


def _propagate_step(
    target: torch.Tensor,
    ctx_feats: torch.Tensor,
    ctx_labels: torch.Tensor,
    window: torch.Tensor,
    topk: int,
    temperature: float,
    chunk: int,
) -> torch.Tensor:
    """Soft labels (N, C) of ``target`` (N, D) from context features (n_ctx, N, D) and labels (n_ctx·N, C),
    computed for ``chunk`` target tokens at a time to bound the (chunk, n_ctx·N) affinity matrix."""
    n_ctx, n_tok, _ = ctx_feats.shape
    out = []
    for start in range(0, n_tok, chunk):
        rows = slice(start, min(start + chunk, n_tok))
        sim = torch.einsum("nd,cmd->ncm", target[rows], ctx_feats).reshape(-1, n_ctx * n_tok)
        valid = window[rows].repeat(1, n_ctx)
        out.append(propagation_weights(sim, valid, topk, temperature) @ ctx_labels)
    return torch.cat(out)


def propagate_labels(
    frame_features: Sequence[torch.Tensor],
    first_mask: np.ndarray,
    n_last_frames: int = 7,
    topk: int = 5,
    temperature: float = 0.1,
    neighborhood: int = 12,
    out_size: tuple[int, int] | None = None,
    void_label: int = 255,
    chunk: int = 2048,
) -> list[np.ndarray]:
    """Propagate ``first_mask`` (H, W) object ids through a video (see module docstring).

    frame_features: T tensors (h, w, D), one per frame, frame 0 first, all on one device (CPU or GPU).
    Returns T masks (H, W) int64 (``out_size`` if given); mask 0 is ``first_mask`` itself (void → 0),
    as DINO writes it. ``chunk`` target tokens are processed at a time (memory bound only).
    """
    if len(frame_features) == 0:
        raise UserError("label propagation got no frames")
    feats = [F.normalize(torch.as_tensor(f, dtype=torch.float32), dim=-1) for f in frame_features]
    h, w, dim = feats[0].shape
    if any(f.shape != (h, w, dim) for f in feats):
        raise UserError("label propagation: every frame's features must have the same (h, w, D) shape")
    device = feats[0].device
    first_mask = np.asarray(first_mask)
    out_size = tuple(out_size) if out_size is not None else tuple(first_mask.shape)
    feats = [f.reshape(h * w, dim) for f in feats]
    first_labels = _first_frame_labels(first_mask, (h, w), void_label).to(device)
    window = neighbourhood_mask(h, w, neighborhood).to(device)
    recent: list[tuple[torch.Tensor, torch.Tensor]] = []
    first = torch.as_tensor(np.where(first_mask == void_label, 0, first_mask).astype(np.int64))
    masks = [F.interpolate(first[None, None].double(), size=out_size, mode="nearest-exact")[0, 0].long().numpy()]
    for target in feats[1:]:
        ctx_feats = torch.stack([feats[0]] + [f for f, _ in recent])  # (n_ctx, N, D)
        ctx_labels = torch.cat([first_labels] + [s for _, s in recent])  # (n_ctx·N, C)
        soft = _propagate_step(target, ctx_feats, ctx_labels, window, topk, temperature, chunk)
        if n_last_frames > 0:
            recent = (recent + [(target, soft)])[-n_last_frames:]
        masks.append(_soft_to_mask(soft.T.reshape(-1, h, w).cpu(), out_size))
    return masks


# ---------------------------------------------------------------- DAVIS measures


def region_j(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard |P∩G| / |P∪G| of two binary masks; 1.0 when both are empty (``db_eval_iou``)."""
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise UserError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """1-px boundary of a binary mask, offset half a pixel towards the origin (``_seg2bmap``).

    b = m ⊕ east | m ⊕ south | m ⊕ south-east, where east/south shift the mask by one pixel (zero-filled);
    the last row uses only m ⊕ east, the last column only m ⊕ south, and the bottom-right pixel is 0."""
    m = np.asarray(mask).astype(bool)
    east = np.zeros_like(m)
    south = np.zeros_like(m)
    south_east = np.zeros_like(m)
    east[:, :-1] = m[:, 1:]
    south[:-1, :] = m[1:, :]
    south_east[:-1, :-1] = m[1:, 1:]
    b = (m ^ east) | (m ^ south) | (m ^ south_east)
    b[-1, :] = m[-1, :] ^ east[-1, :]
    b[:, -1] = m[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) uint8 structuring element, 1 where x² + y² ≤ r² (``skimage.morphology.disk``)."""
    r = int(radius)
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y <= r * r).astype(np.uint8)


def boundary_tolerance(shape: tuple[int, int], bound_th: float = 0.008) -> int:
    """Matching radius in px: ``bound_th`` itself when ≥ 1, else ⌈bound_th · √(H² + W²)⌉."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(*shape)))


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """DAVIS boundary F-measure (``f_measure``) of binary masks.

    precision = |B_P ∩ dilate(B_G)| / |B_P|, recall = |B_G ∩ dilate(B_P)| / |B_G|, dilation by
    ``disk(boundary_tolerance)``; F = 2PR / (P + R) (0 if P + R = 0). Empty boundaries: none in P only →
    P = 1, R = 0; none in G only → P = 0, R = 1; none in both → F = 1.
    """
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise UserError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    kernel = disk(boundary_tolerance(pred.shape, bound_th))
    b_pred, b_gt = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(b_pred.sum()), int(b_gt.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    pred_dil = cv2.dilate(b_pred.astype(np.uint8), kernel).astype(bool)
    gt_dil = cv2.dilate(b_gt.astype(np.uint8), kernel).astype(bool)
    precision = np.count_nonzero(b_pred & gt_dil) / n_pred
    recall = np.count_nonzero(b_gt & pred_dil) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def evaluate_sequence(
    pred_masks: Sequence[np.ndarray],
    gt_masks: Sequence[np.ndarray],
    bound_th: float = 0.008,
    exclude_last: bool = True,
    void_label: int = 255,
) -> dict:
    """Per-object J and F of one sequence, in the DAVIS semi-supervised protocol.

    pred_masks / gt_masks: T (H, W) id maps each. Objects = 1..max(gt frame 0). Frames scored: 1..T−2
    (``exclude_last=True``, the official rule) or 1..T−1. Per object: mean and recall (fraction > 0.5)
    over the scored frames. Returns ``{"objects": [{"id", "J", "F", "J_recall", "F_recall"}], "J", "F",
    "JF"}`` with J, F the means over objects and JF = (J + F) / 2.
    """
    if len(pred_masks) != len(gt_masks):
        raise UserError(f"sequence has {len(gt_masks)} GT frames but {len(pred_masks)} predicted frames")
    frames = range(1, len(gt_masks) - 1 if exclude_last else len(gt_masks))
    if len(frames) == 0:
        raise UserError(f"sequence of {len(gt_masks)} frames has no frame to score")
    gts = [np.where(np.asarray(g) == void_label, 0, np.asarray(g)) for g in gt_masks]
    objects = []
    for obj in range(1, int(gts[0].max()) + 1):
        js = [region_j(np.asarray(pred_masks[t]) == obj, gts[t] == obj) for t in frames]
        fs = [boundary_f(np.asarray(pred_masks[t]) == obj, gts[t] == obj, bound_th) for t in frames]
        objects.append(
            {
                "id": obj,
                "J": float(np.mean(js)),
                "F": float(np.mean(fs)),
                "J_recall": float(np.mean(np.asarray(js) > 0.5)),
                "F_recall": float(np.mean(np.asarray(fs) > 0.5)),
            }
        )
    return {"objects": objects, **_means(objects)}


def _means(objects: list[dict]) -> dict:
    if not objects:
        return {"J": None, "F": None, "JF": None}
    j = float(np.mean([o["J"] for o in objects]))
    f = float(np.mean([o["F"] for o in objects]))
    return {"J": j, "F": f, "JF": (j + f) / 2}


def summarize_davis(sequence_results: Sequence[dict]) -> dict:
    """Dataset J, F, J&F: means over all objects of all sequences (results of :func:`evaluate_sequence`)."""
    return _means([o for r in sequence_results for o in r["objects"]])
