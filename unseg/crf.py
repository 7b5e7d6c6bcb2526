"""Dense CRF post-processing (Krähenbühl & Koltun), the MaskDistill paper's last Table-S1 row.

Released settings (reference.md §1.1, ``utils/crf.py``): 10 mean-field iterations, a Gaussian
kernel (sxy 1, compat 3) and a bilateral kernel (sxy 67, srgb 3, compat 4) on the softmax output.
Needs ``pydensecrf`` (installed from the ``pydensecrf2`` wheel); imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unseg.data.index import ImageEntry, read_image
from unseg.errors import UserError
from unseg.progress import progress


@dataclass(frozen=True)
class CRFConfig:
    iterations: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0


def dense_crf(image: np.ndarray, logits: torch.Tensor, cfg: CRFConfig = CRFConfig()) -> np.ndarray:
    """(H, W, 3) uint8 image, (C, H, W) logits -> (H, W) int64 labels after CRF inference."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise UserError("evaluate.crf needs pydensecrf: pip install pydensecrf2") from err
    probs = torch.softmax(logits.float(), 0).numpy()
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=cfg.gauss_sxy, compat=cfg.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=cfg.bilateral_compat
    )
    q = np.array(crf.inference(cfg.iterations)).reshape(c, h, w)
    return q.argmax(0).astype(np.int64)


def crf_label_maps(
    model, entries: Sequence[ImageEntry], device, input_size: int | None, amp: bool = False
) -> dict[int, np.ndarray]:
    """DeepLab's logits of each entry's image refined by :func:`dense_crf` (released settings): {image id: labels}.
    The Table-1 "+ CRF" row and every CRF self-training round label their images with it."""
    from unseg.deeplab import predict_semantic

    maps = {}
    for e in progress(entries, desc="crf"):
        image = read_image(e)
        _, logits = predict_semantic(
            model, torch.from_numpy(image).permute(2, 0, 1), device, return_logits=True, amp=amp, input_size=input_size
        )
        maps[e.id] = dense_crf(image, logits)
    return maps
