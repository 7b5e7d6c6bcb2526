"""Class labels for mined masks: one CLS feature per mask, then K-means (MaskDistill Sec. 3.2, "Distill Mask R-CNN").

Three ways to get a mask's feature:
- ``masked`` (the paper's text): the ViT input (resized, normalised, fitted to the patch grid) is
  multiplied by the nearest-upsampled token mask, so pixels outside the mask take the value 0, the
  mean colour after normalisation; the feature is the CLS token after the final LayerNorm.
- ``bbox_crop`` (the released ``utils/cluster.py``): the mask's bounding box cropped from the image
  at its native resolution, no masking, zero-padded (in normalised space) to a multiple of the patch.
- ``patch_mean`` (an extension): the unmasked image through the ViT; the feature is the mean of the
  last-layer patch tokens inside the mask (the object seen in its context, as dense features are read).

Features are whitened (each dimension divided by its std, no centring: ``scipy.cluster.vq.whiten``)
and L2-normalised, then clustered by scikit-learn MiniBatchKMeans (the released code), faiss, or the
project's full-batch Lloyd K-means in torch (``lloyd``), seeded.
Cluster ids are label-free; ground truth enters only in evaluation (or the ``align_to_gt`` flag). An extension,
``background`` clusters: K-means with extra clusters, and the ones whose masks lie on the image border are dropped
as background mined by mistake (:func:`assign_clusters`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from unseg import coco
from unseg.data.transforms import (
    Geometry,
    fit_canvas,
    geometry,
    normalize,
    resize_image,
    token_mask_to_pixels,
    vit_input,
)
from unseg.errors import UserError
from unseg.memory import trim_heap
from unseg.mining import border_fraction


def masked_input(image: np.ndarray, token_mask: np.ndarray, geom: Geometry) -> torch.Tensor:
    """(3, h', w') ViT input with everything outside the (nearest-upsampled) token mask set to 0."""
    x = vit_input(image, geom)
    m = torch.from_numpy(np.repeat(np.repeat(token_mask, geom.patch, 0), geom.patch, 1))
    return x * m.to(x.dtype)


def bbox_crop_input(image: np.ndarray, pixel_mask: np.ndarray, patch: int) -> torch.Tensor:
    """(3, h', w') crop of the mask's bounding box at native resolution, zero-padded to the patch grid."""
    ys, xs = np.nonzero(pixel_mask)
    crop = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    x = normalize(crop)
    h, w = x.shape[-2:]
    return fit_canvas(x, (-(-h // patch) * patch, -(-w // patch) * patch))


def retokenise(pixel_mask: np.ndarray, geom: Geometry) -> np.ndarray:
    """A pixel mask at the original size -> the token grid of ``geom`` (a patch is in if most of it is)."""
    m = torch.from_numpy(pixel_mask.astype(np.float32))[None]
    m = fit_canvas(resize_image(m, geom.resized), geom.canvas)
    return (torch.nn.functional.avg_pool2d(m[None], geom.patch)[0, 0] > 0.5).numpy()


def _on_model_grid(token_mask: np.ndarray, geom: Geometry, patch: int) -> tuple[np.ndarray, Geometry]:
    """The mined token mask and its geometry on the clustering ViT's grid (re-tokenised if its patch differs)."""
    if patch == geom.patch:
        return token_mask, geom
    short = geom.resized[0] if geom.original[0] <= geom.original[1] else geom.resized[1]
    other = geometry(*geom.original, short, patch, "pad" if geom.canvas[0] >= geom.resized[0] else "crop")
    return retokenise(token_mask_to_pixels(token_mask, geom, "nearest"), other), other


def mask_input(
    image: np.ndarray, token_mask: np.ndarray, geom: Geometry, mode: str, patch: int, upsample: str = "nearest"
) -> tuple[torch.Tensor | None, np.ndarray, np.ndarray | None]:
    """The clustering ViT's input for one mined mask, the mask at the original resolution, and the mask
    on the clustering ViT's token grid (None for ``bbox_crop``, whose input is not that grid).

    ``token_mask`` lives on the mining grid ``geom``; ``patch`` is the clustering ViT's patch size
    (the paper clusters with ViT-S/8 masks mined with ViT-S/16: the mask is then re-tokenised).
    ``masked``: the image with the pixels outside the mask zeroed; ``bbox_crop``: the mask's box at
    native resolution; ``patch_mean``: the whole image (the mask weighs its tokens, :func:`mask_features`).
    Returns (None, empty mask, None) when the mask is empty.
    """
    pixel_mask = token_mask_to_pixels(token_mask, geom, upsample)
    if not pixel_mask.any():
        return None, pixel_mask, None
    if mode == "bbox_crop":
        return bbox_crop_input(image, pixel_mask, patch), pixel_mask, None
    if mode not in ("masked", "patch_mean"):
        raise ValueError(f"unknown cluster input {mode!r}")
    token_mask, grid = _on_model_grid(token_mask, geom, patch)
    if mode == "patch_mean":
        return vit_input(image, grid), pixel_mask, token_mask
    return masked_input(image, token_mask, grid), pixel_mask, token_mask


def cluster_features(
    features: np.ndarray, k: int, seed: int, whiten: bool = True, algorithm: str = "minibatch", batch_size: int = 1000
) -> tuple[KMeansResult, np.ndarray]:
    """Whiten (optional) + L2-normalise + K-means. Returns the result and the whitening std."""
    if whiten:
        x, std = whiten_l2(features)
    else:
        std = np.ones(features.shape[1], np.float64)
        x = (features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)
    return kmeans(x, k, seed, algorithm, batch_size), std


def whiten_l2(features: np.ndarray, std: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Divide each dimension by its std (no centring), then L2-normalise rows. Returns (features, std)."""
    x = features.astype(np.float64)
    if std is None:
        std = x.std(axis=0)
        std[std == 0] = 1.0
    x = x / std
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    return x.astype(np.float32), std


@dataclass
class KMeansResult:
    labels: np.ndarray  # (M,) cluster of each feature
    centers: np.ndarray  # (k, D)


def kmeans(
    x: np.ndarray,
    k: int,
    seed: int,
    algorithm: str = "minibatch",
    batch_size: int = 1000,
    n_init: int = 3,
    max_iter: int | None = None,
    fit_rows: np.ndarray | None = None,
    init: str = "k-means++",
) -> KMeansResult:
    """K-means with ``k`` clusters on rows of ``x`` (already whitened/normalised), deterministic given ``seed``.

    ``minibatch``: scikit-learn MiniBatchKMeans (``max_iter`` default 100); ``faiss``: faiss.Kmeans
    (``niter`` default 50, ``nredo = n_init``); ``lloyd``: :func:`lloyd_kmeans` (``max_iter`` default 50,
    ``n_init`` seedings by ``init``; ``batch_size`` unused). With ``fit_rows`` the centres are fitted on those rows
    only and every row is then assigned to its nearest centre.
    """
    fit = x if fit_rows is None else x[fit_rows]
    if len(fit) < k:
        raise ValueError(
            f"K-means needs at least k={k} features, got {len(fit)} (mine more images or lower cluster.classes)"
        )
    if algorithm == "minibatch":
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(
            n_clusters=k, random_state=seed, batch_size=batch_size, n_init=n_init, max_iter=max_iter or 100
        ).fit(fit)
        labels = km.labels_ if fit_rows is None else km.predict(x)
        return KMeansResult(labels.astype(np.int64), km.cluster_centers_.astype(np.float32))
    if algorithm == "faiss":
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=max_iter or 50, nredo=n_init, seed=seed, verbose=False)
        km.train(np.ascontiguousarray(fit, dtype=np.float32))
        _, labels = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return KMeansResult(labels[:, 0].astype(np.int64), km.centroids.astype(np.float32))
    if algorithm == "lloyd":
        rows = torch.from_numpy(np.ascontiguousarray(fit, dtype=np.float32))
        centers = lloyd_kmeans(rows, k, seed, n_init=n_init, max_iter=max_iter or 50, init=init)
        labels = nearest_center(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), centers)[0]
        return KMeansResult(labels.numpy().astype(np.int64), centers.numpy())
    raise UserError(f"K-means algorithm must be 'minibatch', 'faiss' or 'lloyd', got {algorithm!r}")


def nearest_center(
    x: torch.Tensor, centers: torch.Tensor, x_sq: torch.Tensor | None = None, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, squared distance) of each row of ``x`` (N, D) to its nearest row of ``centers`` (k, D):
    argmin of ||c||^2 - 2 x.c (||x||^2 is the same for every centre, added after the min; pass it as
    ``x_sq`` to reuse it), in row chunks of memory N_chunk * k."""
    x_sq = torch.linalg.vector_norm(x, dim=1) ** 2 if x_sq is None else x_sq
    c_sq = torch.linalg.vector_norm(centers, dim=1) ** 2
    if len(x) <= chunk:  # one block: no split and concatenation (most calls; the K-means loop runs it often)
        best, labels = torch.addmm(c_sq, x, centers.T, alpha=-2).min(1)
        return labels, (best + x_sq).clamp_min_(0)
    labels, dists = [], []
    for part in x.split(chunk):
        best, label = torch.addmm(c_sq, part, centers.T, alpha=-2).min(1)
        labels.append(label)
        dists.append(best)
    return torch.cat(labels), (torch.cat(dists) + x_sq).clamp_min_(0)


def kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, the variant scikit-learn uses): each next
    centre is, of 2 + ln k candidates drawn with probability proportional to D(x)^2 (the squared distance
    to the nearest centre so far), the one that leaves the smallest sum of D(x)^2."""
    x_sq = torch.linalg.vector_norm(x, dim=1) ** 2 if x_sq is None else x_sq
    trials = 2 + int(math.log(k))
    first = x[torch.randint(len(x), (1,), generator=gen)]
    centers = [first[0]]
    d2 = nearest_center(x, first, x_sq)[1]
    for _ in range(1, k):
        weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
        cand = x[torch.multinomial(weights, trials, replacement=True, generator=gen)]  # (trials, D)
        cand_d2 = (x_sq[:, None] - 2 * (x @ cand.T) + (cand * cand).sum(1)).clamp_min(0)
        new_d2 = torch.minimum(d2[:, None], cand_d2)  # (N, trials)
        best = int(new_d2.sum(0).argmin())
        centers.append(cand[best])
        d2 = new_d2[:, best]
    return torch.stack(centers)


def lloyd_kmeans(
    x: torch.Tensor,
    k: int,
    seed: int,
    n_init: int = 3,
    max_iter: int = 50,
    init: str = "k-means++",
    max_rows_per_center: int | None = 256,
) -> torch.Tensor:
    """Full-batch Lloyd K-means on rows of ``x`` (N, D): at most ``max_iter`` assign/update rounds (stops
    when no label changes), best inertia of ``n_init`` seedings. An emptied cluster takes the row farthest
    from its nearest centre. Returns the centres (k, D).

    ``init``: ``k-means++`` (:func:`kmeans_pp`) or ``random`` (k distinct rows, as faiss seeds).
    ``max_rows_per_center``: with more than k times that many rows, the centres are fitted on a seeded
    random sample of that size (faiss's ``max_points_per_centroid``, default 256 there too); ``None``:
    every row."""
    gen = torch.Generator().manual_seed(seed)
    if max_rows_per_center is not None and len(x) > k * max_rows_per_center:
        x = x[torch.randperm(len(x), generator=gen)[: k * max_rows_per_center]]
    x_sq = torch.linalg.vector_norm(x, dim=1) ** 2
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        if init == "k-means++":
            centers = kmeans_pp(x, k, gen, x_sq)
        elif init == "random":
            centers = x[torch.randperm(len(x), generator=gen)[:k]]
        else:
            raise ValueError(f"K-means init must be 'k-means++' or 'random', got {init!r}")
        labels = None
        for _ in range(max_iter):
            new_labels, d2 = nearest_center(x, centers, x_sq)
            if labels is not None and torch.equal(new_labels, labels):
                break  # converged: d2 belongs to these centres
            labels = new_labels
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k)
            centers = sums / counts.clamp_min(1)[:, None].to(x.dtype)
            if int(counts.min()) == 0:
                for empty in (counts == 0).nonzero()[:, 0]:
                    far = int(d2.argmax())
                    centers[empty], d2[far] = x[far], 0
        else:  # out of rounds: the last update moved the centres
            d2 = nearest_center(x, centers, x_sq)[1]
        inertia = float(d2.sum())
        if inertia < best_inertia:
            best, best_inertia = centers, inertia
    return best


@torch.no_grad()
def mask_features(
    model: torch.nn.Module,
    items: Iterable[tuple[int, np.ndarray, np.ndarray, Geometry]],
    mode: str,
    device: torch.device,
    batch_size: int = 32,
    upsample: str = "nearest",
) -> tuple[np.ndarray, list[dict]]:
    """One feature per non-empty mined mask, streamed: memory holds one batch of inputs at a time.

    ``items`` yields (image id, image (H, W, 3) uint8, token mask on the mining grid, mining geometry).
    Consecutive inputs of one shape share a batch. Returns features (M, D) float32 and M COCO
    annotations of the masks at the original resolution (``category_id`` 0 until :func:`assign_clusters`).
    The feature is the CLS token after the final norm (``masked``, ``bbox_crop``) or, for ``patch_mean``
    (an extension), the mean of the unmasked image's last-layer patch tokens inside the mask.
    """
    patch = int(model.patch_embed.patch_size[0])
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    feats: list[np.ndarray] = []
    anns: list[dict] = []
    pending: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []  # patch_mean: each input's token mask on the model grid, flattened

    def flush() -> None:
        if pending:
            tokens = model.forward_features(torch.stack(pending).to(device)).float()
            if mode == "patch_mean":
                w = torch.stack(weights).to(tokens)[..., None]
                feats.append(((tokens[:, prefix:] * w).sum(1) / w.sum(1).clamp(min=1.0)).cpu().numpy())
            else:
                feats.append(tokens[:, 0].cpu().numpy().copy())  # a view would keep the batch's tokens alive
            pending.clear()
            weights.clear()
            trim_heap()  # the batch's activations, freed: back to the OS, or peak RSS grows with the batches

    for image_id, image, token_mask, geom in items:
        x, pixel_mask, model_mask = mask_input(image, token_mask, geom, mode, patch, upsample)
        if x is None:
            continue
        if pending and (x.shape != pending[0].shape or len(pending) == batch_size):
            flush()
        pending.append(x)
        if mode == "patch_mean":
            weights.append(torch.from_numpy(model_mask.reshape(-1).astype(np.float32)))
        anns.append(coco.annotation(len(anns) + 1, image_id, 0, pixel_mask))
    flush()
    dim = int(model.embed_dim)
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), anns


def _pixel_border_fraction(mask: np.ndarray) -> float:
    """Share of the image's border pixels inside an (H, W) mask: :func:`unseg.mining.border_fraction` on pixels."""
    return float(border_fraction(torch.from_numpy(mask.astype(bool)).reshape(1, -1), mask.shape)[0])


def background_clusters(labels: np.ndarray, border: np.ndarray, k: int, n: int) -> np.ndarray:
    """The ``n`` clusters (of ``k``) whose masks cover the most image border on average, most first.

    The background prior of TokenCut and MaskCut (the same as ``mining.proposals: auto``) applied to whole
    clusters: a cluster of masks that lie on the image border is the background mined by mistake, not an
    object category. labels (M,) int in [0, k), border (M,) float -> (n,) int64; an empty cluster ranks last.
    """
    sums = np.bincount(labels, weights=border, minlength=k)
    counts = np.bincount(labels, minlength=k)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), -1.0)
    return np.argsort(-mean, kind="stable")[:n].astype(np.int64)


def assign_clusters(
    features: np.ndarray,
    anns: list[dict],
    k: int,
    seed: int,
    whiten: bool = True,
    algorithm: str = "minibatch",
    batch_size: int = 1000,
    background: int = 0,
) -> tuple[KMeansResult, np.ndarray, list[dict]]:
    """K-means over the mask features into ``k + background`` clusters; returns (result, std, kept annotations).

    ``background`` = 0 (the paper): every mask is kept, ``category_id = cluster + 1``. With ``background`` = B > 0
    (an extension), the B clusters whose masks cover the most image border (:func:`background_clusters`) are
    background mined by mistake: their masks are dropped, and the other k clusters are numbered 1..k in cluster
    order. ``result.labels`` holds each mask's final 0-based category, -1 for a dropped one; ``result.centers``
    the kept clusters' centres in category order, then the dropped ones'.
    """
    km, std = cluster_features(features, k + background, seed, whiten, algorithm, batch_size)
    labels, centers = km.labels, km.centers
    if background:
        border = np.array([_pixel_border_fraction(coco.decode_rle(a["segmentation"])) for a in anns])
        dropped = background_clusters(labels, border, k + background, background)
        keep = np.setdiff1d(np.arange(k + background), dropped)
        relabel = np.full(k + background, -1, dtype=np.int64)
        relabel[keep] = np.arange(k)
        labels, centers = relabel[labels], centers[np.concatenate([keep, dropped])]
    kept = []
    for ann, label in zip(anns, labels, strict=True):
        if label >= 0:
            ann["category_id"] = int(label) + 1
            kept.append(ann)
    return KMeansResult(labels, centers), std, kept


def align_to_ground_truth(
    anns: list[dict], gt_instances: dict[int, list[dict]], k: int, n_object_classes: int
) -> list[dict]:
    """Reproduction of the released ``utils/cluster.py``: relabel clusters with ground-truth classes.

    Each mask votes for the class of the GT instance with the largest box IoU in its image; clusters are
    matched to object classes 1..C by the Hungarian algorithm (k == C) or by majority (k > C). Clusters
    left unmatched keep no class and their masks are dropped. Used only with ``cluster.align_to_gt``.
    """
    from unseg.matching import box_iou_xyxy, hungarian_mapping, majority_mapping

    def xyxy(b):
        return np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]], np.float64)

    votes = np.zeros((k, n_object_classes), np.int64)
    for ann in anns:
        cands = gt_instances.get(ann["image_id"], [])
        if cands:
            ious = box_iou_xyxy(xyxy(ann["bbox"]), np.stack([xyxy(c["bbox"]) for c in cands]))
            votes[ann["category_id"] - 1, cands[int(np.argmax(ious))]["category_id"] - 1] += 1
    mapping = hungarian_mapping(votes) if k <= n_object_classes else majority_mapping(votes)
    out = []
    for ann in anns:
        cls = int(mapping[ann["category_id"] - 1])
        if cls >= 0:
            out.append({**ann, "category_id": cls + 1})
    return out
