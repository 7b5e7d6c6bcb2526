"""Checkpoints are read as weights only: a pickle that would run code is refused, never executed."""

import argparse
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from unseg.errors import UserError
from unseg.models.checkpoint import read_checkpoint
from unseg.models.vit import create_vit, load_vit_weights

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this calls os.system: the classic hostile checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_with_one_line(tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pth"
    torch.save({"teacher": Payload(marker)}, bad)
    with pytest.raises(UserError) as err:
        read_checkpoint(bad, "backbone.weights")
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and "backbone.weights" in message and "refusing" in message


def test_the_vit_loader_refuses_it_too(tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pth"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Payload(marker)}, f)  # a plain pickle file, not torch.save
    with pytest.raises(UserError):
        load_vit_weights(create_vit("vit_tiny_patch16_224", 8, 1), bad)
    assert not marker.exists()


def test_an_official_dino_training_checkpoint_with_its_args_namespace_loads(tmp_path):
    vit = create_vit("vit_tiny_patch16_224", 8, 1)
    state = {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": state, "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", patch_size=8)}, path)
    other = create_vit("vit_tiny_patch16_224", 8, 1)
    load_vit_weights(other, path)
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), other.state_dict().values(), strict=True))


def test_the_committed_checkpoints_are_weights_only():
    for path in sorted((ROOT / "checkpoints").glob("*.pth")):
        assert isinstance(read_checkpoint(path, path.name), dict)


def test_a_non_checkpoint_file_is_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError) as err:
        read_checkpoint(junk, "croc.reuse")
    assert "\n" not in str(err.value) and "croc.reuse" in str(err.value)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
