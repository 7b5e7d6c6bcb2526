"""A trained network as one portable file, ``model.pt``: what rebuilds and applies it without ``params.yaml``.

    import unseg
    model, prep = unseg.load_model("artifacts/deeplab/model.pt")  # a ready nn.Module (eval mode) and its inputs
    logits = model(prep.tensor(image))                            # image: (H, W, 3) uint8 RGB

This module is the format only (what a training stage imports to write one); :mod:`unseg.models.loading`
rebuilds any bundle's network.

A bundle is a dict of tensors and plain data (it loads with ``weights_only=True``):
``format`` (:data:`FORMAT`), ``kind`` (``deeplab`` | ``maskrcnn``), ``backend`` (Mask R-CNN: ``torchvision`` |
``detectron2``), ``architecture`` (the builder's keyword arguments, or detectron2's flat config), ``model``
(the state dict), ``num_classes``, ``category_ids`` (Mask R-CNN: pseudo-label category of each class),
``preprocess`` (:class:`Preprocess` as a dict), ``params_digest`` (of the params section that trained it) and
``commit`` (the git commit of the code that wrote it, ``+dirty`` when its library or stage code differed).
"""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unseg.errors import UserError
from unseg.models.checkpoint import read_checkpoint, save_checkpoint

FORMAT = "unseg-model/1"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # as unseg.models.vit
KINDS = ("deeplab", "maskrcnn")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input. DeepLab: resized to ``input_size`` x ``input_size`` (None: as
    is), [0, 1], normalised by ``mean``/``std`` inside the model, logits upsampled back to the image.
    Mask R-CNN: [0, 1] at full size; the model resizes the shorter side to ``short_side`` (longer side at most
    ``max_size``) and pastes masks back."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int | None = None
    short_side: int | None = None
    max_size: int | None = None
    output_stride: int | None = None

    def tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> the network's (1, 3, h, w) float input in [0, 1] (DeepLab)."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        if self.input_size is not None:
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x


def code_commit(root: Path | None = None) -> str | None:
    """The git commit of the code in ``root`` (default: this package's checkout), ``+dirty`` when ``unseg/`` or
    ``stages/`` differ from it; None outside a git checkout."""
    root = root or Path(__file__).resolve().parents[2]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return None
    dirty = git("diff", "--quiet", "HEAD", "--", "unseg", "stages").returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def make_bundle(
    kind: str,
    *,
    model: nn.Module,
    architecture: dict,
    num_classes: int,
    preprocess: Preprocess,
    params_digest: str,
    backend: str | None = None,
    category_ids: list[int] | None = None,
) -> dict:
    """The bundle dict of a trained network (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {
        "format": FORMAT,
        "kind": kind,
        "backend": backend,
        "architecture": architecture,
        "model": model.state_dict(),
        "num_classes": int(num_classes),
        "category_ids": category_ids,
        "preprocess": dataclasses.asdict(preprocess),
        "params_digest": params_digest,
        "commit": code_commit(),
    }


def save_bundle(bundle: dict, path: str | Path) -> Path:
    return save_checkpoint(bundle, path)


def read_bundle(path: str | Path, kind: str | None = None) -> dict:
    """A bundle file, checked: one line when it is missing, not a bundle, of another format or another kind."""
    bundle = read_checkpoint(path, "model")
    if not isinstance(bundle, dict) or "format" not in bundle:
        raise UserError(f"{path}: not an unseg model bundle (written by train_deeplab or distill_maskrcnn)")
    if bundle["format"] != FORMAT:
        raise UserError(f"{path}: bundle format {bundle['format']!r}, this unseg reads {FORMAT!r}")
    if kind is not None and bundle.get("kind") != kind:
        raise UserError(f"{path}: a {bundle.get('kind')} model, not a {kind} one")
    return bundle


def load_state(model: nn.Module, bundle: dict) -> nn.Module:
    """The bundle's weights into ``model`` (strict: every tensor, no other), which then goes to eval mode."""
    try:
        model.load_state_dict(bundle["model"], strict=True)
    except RuntimeError as err:
        raise UserError(f"the bundle's weights do not fit its own architecture ({str(err).splitlines()[0]})") from err
    return model.eval()
