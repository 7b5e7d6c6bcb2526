"""Class labels for mined masks: one CLS feature per mask, then K-means (MaskDistill Sec. 3.2, "Distill Mask R-CNN").

Two ways to get a mask's feature:
- ``masked`` (the paper's text): the ViT input (resized, normalised, fitted to the patch grid) is
  multiplied by the nearest-upsampled token mask, so pixels outside the mask take the value 0, the
  mean colour after normalisation; the feature is the CLS token after the final LayerNorm.
- ``bbox_crop`` (the released ``utils/cluster.py``): the mask's bounding box cropped from the image
  at its native resolution, no masking, zero-padded (in normalised space) to a multiple of the patch.

Features are whitened (each dimension divided by its std, no centring: ``scipy.cluster.vq.whiten``)
and L2-normalised, then clustered by scikit-learn MiniBatchKMeans or faiss, seeded.
Cluster ids are label-free; ground truth enters only in evaluation (or the ``align_to_gt`` flag).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unseg.data.transforms import (
    Geometry,
    fit_canvas,
    geometry,
    normalize,
    resize_image,
    token_mask_to_pixels,
    vit_input,
)


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


def mask_input(
    image: np.ndarray, token_mask: np.ndarray, geom: Geometry, mode: str, patch: int, upsample: str = "nearest"
) -> tuple[torch.Tensor | None, np.ndarray]:
    """The clustering ViT's input for one mined mask, and the mask at the original resolution.

    ``token_mask`` lives on the mining grid ``geom``; ``patch`` is the clustering ViT's patch size
    (the paper clusters with ViT-S/8 masks mined with ViT-S/16: the mask is then re-tokenised).
    Returns (None, empty mask) when the mask is empty.
    """
    pixel_mask = token_mask_to_pixels(token_mask, geom, upsample)
    if not pixel_mask.any():
        return None, pixel_mask
    if mode == "bbox_crop":
        return bbox_crop_input(image, pixel_mask, patch), pixel_mask
    if mode != "masked":
        raise ValueError(f"unknown cluster input {mode!r}")
    if patch != geom.patch:
        short = geom.resized[0] if geom.original[0] <= geom.original[1] else geom.resized[1]
        other = geometry(*geom.original, short, patch, "pad" if geom.canvas[0] >= geom.resized[0] else "crop")
        return masked_input(
            image, retokenise(token_mask_to_pixels(token_mask, geom, "nearest"), other), other
        ), pixel_mask
    return masked_input(image, token_mask, geom), pixel_mask


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


def kmeans(x: np.ndarray, k: int, seed: int, algorithm: str = "minibatch", batch_size: int = 1000) -> KMeansResult:
    """K-means with ``k`` clusters on rows of ``x`` (already whitened/normalised), deterministic given ``seed``."""
    if len(x) < k:
        raise ValueError(
            f"K-means needs at least k={k} features, got {len(x)} (mine more images or lower cluster.classes)"
        )
    if algorithm == "minibatch":
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3).fit(x)
        return KMeansResult(km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32))
    if algorithm == "faiss":
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=50, nredo=3, seed=seed, verbose=False)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        _, labels = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return KMeansResult(labels[:, 0].astype(np.int64), km.centroids.astype(np.float32))
    raise ValueError(f"unknown K-means algorithm {algorithm!r}")


def assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Nearest centre (Euclidean) of each row."""
    d = (x**2).sum(1, keepdims=True) - 2 * x @ centers.T + (centers**2).sum(1)
    return d.argmin(1)


def semantic_from_mask(pixel_mask: np.ndarray, cluster: int) -> np.ndarray:
    """(H, W) uint8 label map of a pseudo-label: 0 outside the mask, cluster + 1 inside."""
    return (pixel_mask.astype(np.uint8) * np.uint8(cluster + 1)).astype(np.uint8)


@torch.no_grad()
def cls_features(
    model: torch.nn.Module, inputs: list[torch.Tensor], device: torch.device, batch_size: int
) -> np.ndarray:
    """CLS tokens (after the final norm) of a list of inputs; same-shaped inputs are batched together."""
    out = np.zeros((len(inputs), model.embed_dim), np.float32)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for idx in by_shape.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            x = torch.stack([inputs[i] for i in chunk]).to(device)
            out[chunk] = model.forward_features(x)[:, 0].float().cpu().numpy()
    return out
