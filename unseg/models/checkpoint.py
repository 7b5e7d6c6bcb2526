"""Reading a local torch checkpoint safely: tensors and plain data only, never code.

Every checkpoint the project reads goes through :func:`read_checkpoint`. It loads with
``weights_only=True``: a pickle that would construct anything beyond tensors, containers, numbers and
strings is refused with one line instead of being executed. The one class allowed besides those is
``argparse.Namespace``, which official DINO and MoCo training checkpoints store as their ``args``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path

import torch

from unseg.errors import UserError

SAFE_GLOBALS = [argparse.Namespace]


def read_checkpoint(path: str | Path, what: str) -> dict:
    """``torch.load`` of a local file on the CPU, weights only; ``what`` names the param or file in errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: no such file {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle torch can read at all
            raise UserError(f"{what}: cannot read {path} as a torch checkpoint (not a weights file)") from err
        raise UserError(
            f"{what}: {path} holds more than weights (loading it would call {found.group(1)}); refusing to load it. "
            "Save the state dict alone (torch.save(model.state_dict(), path))"
        ) from err
    except Exception as err:  # a corrupt or non-torch file is a user mistake, not a crash
        raise UserError(f"{what}: cannot read {path} as a torch checkpoint ({err})".replace("\n", " ")) from err


def save_checkpoint(obj, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
