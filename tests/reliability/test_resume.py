"""An interrupted extract_features resumes, even after the usual reaction to running out of memory:
a smaller ``features.batch_size``. The resumed store equals an uninterrupted run's."""

import argparse

import numpy as np
import pytest
import torch
import zarr

import stages.extract_features as extract
from stages.prepare import generate
from unseg import features, store
from unseg.data.index import DatasetIndex
from unseg.models.vit import create_vit
from unseg.params import parse_params


def params_with(batch_size: int):
    return parse_params(
        {
            "data": {"n_train": 10, "n_val": 4, "min_side": 32, "max_side": 64},
            "backbone": {"depth": 1},
            "features": {"batch_size": batch_size, "short_side": 32},
        }
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    p = params_with(4)
    generate(p.data, root / "prepared").save(root / "prepared/index.json")
    torch.manual_seed(0)
    vit = create_vit(p.backbone.arch, p.backbone.patch_size, p.backbone.depth, stem=p.backbone.stem)
    torch.save(vit.state_dict(), root / "vit.pth")
    return root


def run(inputs, out, batch_size: int, stop_after: int | None = None, monkeypatch=None):
    args = argparse.Namespace(index=inputs / "prepared/index.json", backbone=inputs / "vit.pth", out=out)
    if stop_after is not None:
        real = features.forward_images

        def interrupted(*a, **kw):
            for n, batch in enumerate(real(*a, **kw)):
                if n == stop_after:
                    raise KeyboardInterrupt
                yield batch

        monkeypatch.setattr(features, "forward_images", interrupted)
        with pytest.raises(KeyboardInterrupt):
            extract.main(args, params_with(batch_size))
        monkeypatch.setattr(features, "forward_images", real)
        return
    extract.main(args, params_with(batch_size))


def test_resume_after_a_smaller_batch_size_equals_one_pass(inputs, tmp_path, monkeypatch):
    with torch.no_grad():
        run(inputs, tmp_path / "once.zarr", 4)
        run(inputs, tmp_path / "resumed.zarr", 4, stop_after=2, monkeypatch=monkeypatch)
        done = zarr.open_group(tmp_path / "resumed.zarr.partial", mode="r").attrs["images_done"]
        run(inputs, tmp_path / "resumed.zarr", 3)
    once, resumed = store.RaggedStore(tmp_path / "once.zarr"), store.RaggedStore(tmp_path / "resumed.zarr")
    p = params_with(3)
    index = DatasetIndex.load(inputs / "prepared/index.json")
    geoms = features.geometries(index.images, p.features.short_side, p.backbone.patch_size, p.features.fit)
    starts = {b[0] for b in features.plan_batches(geoms, features.plan_order(geoms), 3)}
    assert 0 < done < len(index.images) and done not in starts  # batches of 3 have no boundary where it stopped
    assert not (tmp_path / "resumed.zarr.partial").exists()
    for name in ("image_id", "grid", "offsets"):
        np.testing.assert_array_equal(resumed.read(name), once.read(name))
    for name in ("cls", "q", "k"):
        if name in once:
            np.testing.assert_allclose(resumed.read(name), once.read(name), rtol=1e-5, atol=1e-5)
