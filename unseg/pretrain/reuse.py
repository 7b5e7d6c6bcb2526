"""What a CrOC run is determined by, and the reuse of a finished run's checkpoint when that matches.

``training_digest`` hashes the architecture, every CrOC param that changes what training computes and
the training images' bytes; ``pretrain_croc`` stores it in the checkpoint it writes, and ``croc.reuse``
uses such a file only when the digest of the current params and images is the same.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from unseg.models.checkpoint import read_checkpoint
from unseg.pretrain.croc import CrOCConfig
from unseg.pretrain.trainer import CrOCTraining
from unseg.train import harness as H

OBJECTIVE_KEYS = (
    "sinkhorn_lambda",
    "sinkhorn_iters",
    "pos_alpha",
    "marginals_temp_r",
    "marginals_temp_c",
    "uniform_marginals",
    "n_tokens",
    "n_centroids_max",
    "teacher_temp",
    "teacher_temp_c",
    "student_temp",
    "student_temp_c",
    "center_momentum",
    "alpha_s",
)
RUNTIME_KEYS = {"reuse", "device", "workers", "ckpt_every"}  # do not change what training computes


def split_croc_params(c) -> tuple[CrOCTraining, CrOCConfig]:
    """The ``croc`` params section as the trainer's schedule and the objective's config (by field name)."""
    training = CrOCTraining(**{k: getattr(c, k) for k in CrOCTraining.__dataclass_fields__})
    objective = CrOCConfig(**{k: getattr(c, k) for k in OBJECTIVE_KEYS})
    return training, objective


def training_digest(b, c, entries) -> str:
    """What determines the trained weights: architecture (``backbone``), CrOC params and the images' bytes."""
    croc = {k: v for k, v in vars(c).items() if k not in RUNTIME_KEYS}
    arch = {"arch": b.arch, "patch_size": b.patch_size, "depth": b.depth}
    if b.stem != "patch":  # the digests of patch-stem checkpoints stay what they were
        arch["stem"] = b.stem
    return H.params_digest(arch, croc, [H.file_digest(e.file) for e in entries])


def reuse_checkpoint(path: str, digest: str, out: Path, warn: Callable[[str], None], key: str = "croc.reuse") -> bool:
    """Copy ``path`` to ``out`` when it was trained with ``digest`` (True); otherwise ``warn`` in one line and
    return False, so that the caller trains (e.g. on a user's own images). ``key`` names the param in messages
    (``croc.reuse``, ``hsg.reuse``)."""
    meta = read_checkpoint(path, key).get("meta", {})
    if meta.get("digest") != digest:
        warn(
            f"warning: {key}: {path} was trained with other params or data (digest {meta.get('digest')}, "
            f"now {digest}): training from scratch instead ({key}: null says so without this line)"
        )
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, out)
    return True
