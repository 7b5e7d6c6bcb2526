"""Reading a local torch checkpoint with a one-line error for a missing or unreadable file."""

from __future__ import annotations

from pathlib import Path

import torch

from unseg.errors import UserError


def read_checkpoint(path: str | Path, what: str) -> dict:
    """``torch.load`` of a local file on the CPU; ``what`` names the param in error messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: no such file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a corrupt or non-torch file is a user mistake, not a crash
        raise UserError(f"{what}: cannot read {path} as a torch checkpoint ({err})") from err
