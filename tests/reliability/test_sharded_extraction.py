"""extract_features under torchrun: each rank writes its own contiguous share, rank 0 merges them, and the
merged store equals a single process's store row for row."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.prepare import generate
from unseg import store
from unseg.models.vit import create_vit
from unseg.params import overlay, parse_params, schema_defaults

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {
    "data": {"n_train": 9, "n_val": 4, "min_side": 32, "max_side": 64},
    "backbone": {"depth": 1},
    "features": {"batch_size": 2, "short_side": 32},
}


@pytest.mark.parametrize("n, world", [(13, 2), (13, 4), (3, 4), (0, 2)])
def test_shard_bounds_cover_every_image_once_in_order(n, world):
    bounds = [store.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_merge_shards_equals_one_writer(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 6, 7)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows, ids = rng.normal(size=(int(offsets[-1]), 3)).astype(np.float32), np.arange(7) * 10
    specs = {"x": store.Spec((3,), "float32", True), "image_id": store.Spec((), "int64", False)}
    for rank in range(3):
        lo, hi = store.shard_bounds(7, rank, 3)
        w = store.RaggedWriter(store.shard_path(tmp_path / "m.zarr", rank, 3), lengths[lo:hi], specs, {}, "d")
        w.write(0, {"x": rows[offsets[lo] : offsets[hi]], "image_id": ids[lo:hi]})
        w.finalize()
    store.merge_shards(tmp_path / "m.zarr", lengths, specs, {"a": 1}, "d", 3, block=2)
    merged = store.RaggedStore(tmp_path / "m.zarr")
    np.testing.assert_array_equal(merged.read("x"), rows)
    np.testing.assert_array_equal(merged.read("image_id"), ids)
    np.testing.assert_array_equal(merged.offsets, offsets)
    assert merged.attrs["a"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]  # shards removed


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A micro dataset, a random ViT and the single-process ``one.zarr`` of extract_features."""
    tmp_path = tmp_path_factory.mktemp("sharded")
    p = parse_params(PARAMS)
    generate(p.data, tmp_path / "prepared").save(tmp_path / "prepared/index.json")
    torch.manual_seed(0)
    torch.save(create_vit(p.backbone.arch, p.backbone.patch_size, p.backbone.depth, stem=p.backbone.stem).state_dict(),
               tmp_path / "vit.pth")  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(overlay(schema_defaults(), PARAMS)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    stage = ["-m", "stages.extract_features", "prepared/index.json", "vit.pth"]
    one = subprocess.run([sys.executable, *stage, "one.zarr", "--quiet"], cwd=tmp_path, env=env, capture_output=True)
    assert one.returncode == 0, one.stderr.decode()
    return tmp_path


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(extracted):
    tmp_path = extracted
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    stage = ["-m", "stages.extract_features", "prepared/index.json", "vit.pth"]
    # the dvc.yaml command unchanged, torchrun chosen by the environment (unseg/launch.py)
    sharded = {**env, "UNSEG_TORCHRUN": "--standalone --nproc_per_node 2"}
    two = subprocess.run(
        [sys.executable, *stage, "two.zarr", "--quiet"], cwd=tmp_path, env=sharded, capture_output=True
    )
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert "torch.distributed.run" in two.stderr.decode()
    a, b = store.RaggedStore(tmp_path / "one.zarr"), store.RaggedStore(tmp_path / "two.zarr")
    assert len(a) == 13 and not list(tmp_path.glob("two.zarr.shard-*"))
    for name in ("keys", "cls_logits", "cls_token", "grid", "input_size", "image_id", "offsets"):
        np.testing.assert_array_equal(b.read(name), a.read(name), err_msg=name)
    assert b.attrs["digest"] == a.attrs["digest"]


@pytest.mark.slow
def test_pseudo_label_under_torchrun_equals_one_process(extracted):
    import json

    tmp_path = extracted
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run(cmd, extra=None):
        proc = subprocess.run([sys.executable, "-m", *cmd, "--quiet"], cwd=tmp_path, env={**env, **(extra or {})},
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(["stages.mine_masks", "one.zarr", "masks.zarr"])
    args = ["stages.pseudo_label", "prepared/index.json", "vit.pth", "one.zarr", "masks.zarr"]
    run([*args, "pl_one"])
    run([*args, "pl_two"], {"UNSEG_TORCHRUN": "--standalone --nproc_per_node 2"})
    one, two = (json.loads((tmp_path / d / "instances.json").read_text()) for d in ("pl_one", "pl_two"))
    assert one["annotations"] and one["annotations"] == two["annotations"]
    a, b = np.load(tmp_path / "pl_one/kmeans.npz"), np.load(tmp_path / "pl_two/kmeans.npz")
    assert len(a["labels"]) == 13 and (a["labels"] >= 0).sum() == len(one["annotations"])  # background dropped
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["centers"], b["centers"], atol=1e-5)
