"""CrOC's "unsupervised segmentation transfer": one K-means over the dense features of a whole split.

Protocol (CrOC project page, "Transfer learning via unsupervised segmentation"; reference.md §2.4
item 8: no official code, re-implemented from the paper): every token of every image is
L2-normalised, ONE K-means with k = number of GT classes runs over all tokens of all images, each
token takes its cluster id; the caller upsamples the (h, w) cluster maps to the label size (nearest,
:func:`upsample_labels`) and Hungarian-matches clusters to classes with dataset-level counts
(:mod:`unseg.evaluation.metrics`).

Also a raw-pixel baseline: K-means on RGB values, fitted on a random pixel subsample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from unseg.clustering import kmeans
from unseg.errors import UserError


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of (T, D) divided by their Euclidean norm (norm clamped at ``eps``), float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def dense_kmeans_labels(
    features: Sequence[np.ndarray],
    k: int,
    seed: int,
    algorithm: str = "minibatch",
    batch_size: int = 1000,
    n_init: int = 3,
    max_iter: int = 100,
    max_fit_tokens: int | None = None,
) -> list[np.ndarray]:
    """Cluster map (h, w) int64 per image from one K-means over all L2-normalised tokens.

    features: list of (h, w, D) arrays (grids may differ per image, D may not). ``algorithm``:
    ``"minibatch"`` (sklearn ``MiniBatchKMeans``, ``random_state=seed``; the implementation MaskDistill
    uses for its CLS clustering, reference.md §1.2), ``"faiss"`` (``faiss.Kmeans``, ``nredo=n_init``) or
    ``"lloyd"`` (the project's torch K-means, ``unseg.clustering.lloyd_kmeans``).
    ``max_fit_tokens``: when set and smaller than the token count, the centroids are fitted on that many
    tokens drawn uniformly without replacement (seeded), and every token is then assigned (a memory and
    time bound for large splits; ``None`` = fit on all tokens, the protocol as stated).
    """
    if len(features) == 0:
        raise UserError("dense K-means got no feature maps")
    arrays = [np.asarray(f) for f in features]
    if any(a.ndim != 3 for a in arrays) or len({a.shape[2] for a in arrays}) != 1:
        raise UserError("dense K-means features must all be (h, w, D) with the same D")
    tokens = l2_normalise(np.concatenate([a.reshape(-1, a.shape[2]) for a in arrays]))
    fit_rows = None
    if max_fit_tokens is not None and max_fit_tokens < len(tokens):
        fit_rows = np.sort(np.random.default_rng(seed).choice(len(tokens), size=max_fit_tokens, replace=False))
    n_fit = len(tokens) if fit_rows is None else len(fit_rows)
    if not 1 <= k <= n_fit:
        raise UserError(f"dense K-means: k={k} must be between 1 and the number of fitted tokens ({n_fit})")
    ids = kmeans(tokens, k, seed, algorithm, batch_size, n_init, max_iter, fit_rows).labels
    bounds = np.cumsum([0] + [a.shape[0] * a.shape[1] for a in arrays])
    return [ids[s:e].reshape(a.shape[:2]) for a, s, e in zip(arrays, bounds[:-1], bounds[1:], strict=True)]


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) int map → (H, W) by nearest neighbour (``torch`` ``"nearest"``: source index ⌊i·h/H⌋)."""
    t = torch.as_tensor(np.asarray(labels, dtype=np.int64))[None, None].double()
    return F.interpolate(t, size=tuple(size), mode="nearest")[0, 0].long().numpy()


def raw_pixel_kmeans_labels(
    images: Sequence[np.ndarray], k: int, seed: int, max_samples: int = 100_000, n_init: int = 3
) -> list[np.ndarray]:
    """Baseline: K-means on RGB values in [0, 1]. sklearn ``KMeans(random_state=seed)`` is fitted on at most
    ``max_samples`` pixels drawn uniformly without replacement (``numpy`` generator seeded by ``seed``)
    from all images, then every pixel is assigned. images: list of uint8 (H, W, 3); returns (H, W) int64."""
    if len(images) == 0:
        raise UserError("raw-pixel K-means got no images")
    for i, im in enumerate(images):
        if np.asarray(im).ndim != 3 or np.asarray(im).shape[2] != 3:
            raise UserError(f"raw-pixel K-means: image {i} must be (H, W, 3), got shape {np.asarray(im).shape}")
    images = [np.asarray(im) for im in images]
    bounds = np.cumsum([0] + [im.shape[0] * im.shape[1] for im in images])
    rng = np.random.default_rng(seed)
    n = int(min(max_samples, bounds[-1]))
    if not 1 <= k <= n:
        raise UserError(f"raw-pixel K-means: k={k} must be between 1 and the number of sampled pixels ({n})")
    flat = np.sort(rng.choice(int(bounds[-1]), size=n, replace=False))
    owner = np.searchsorted(bounds, flat, side="right") - 1
    sample = np.concatenate([_rgb01(images[i])[flat[owner == i] - bounds[i]] for i in np.unique(owner)])
    km = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(sample)
    return [km.predict(_rgb01(im)).astype(np.int64).reshape(im.shape[:2]) for im in images]


def _rgb01(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) → (H·W, 3) float32 in [0, 1]."""
    return image.reshape(-1, 3).astype(np.float32) / 255.0
