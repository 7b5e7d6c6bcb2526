"""The generated dataset and the adapters (real data from ../shared/data when present)."""

from pathlib import Path

import numpy as np
import pytest

from unseg.data import generated
from unseg.data.index import (
    DatasetIndex,
    index_camvid,
    index_coco,
    index_folder,
    prepare_generated,
    read_image,
)
from unseg.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_generated_samples_are_deterministic_and_consistent():
    a = generated.render_sample(7, 3, 4, 3, 96, 128)
    b = generated.render_sample(7, 3, 4, 3, 96, 128)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    image, semantic, instances = a
    assert image.dtype == np.uint8 and image.shape[:2] == semantic.shape
    assert 1 <= len(instances) <= 3
    union = np.zeros_like(semantic, bool)
    for inst in instances:
        assert np.all(semantic[inst.mask] == inst.category)
        assert not np.any(union & inst.mask)  # visible parts never overlap
        union |= inst.mask
    assert np.array_equal(union, semantic > 0)


def test_colour_does_not_identify_the_category():
    # mean colour of instances of one category spans the colour space like the others do
    means = {c: [] for c in range(1, 5)}
    for i in range(120):
        image, semantic, instances = generated.render_sample(i, 0, 4, 3, 96, 96)
        for inst in instances:
            means[inst.category].append(image[inst.mask].mean(0))
    centre = np.array([np.mean(v, 0) for v in means.values()])
    spread = np.array([np.std(v, 0) for v in means.values()])
    assert np.abs(centre - centre.mean(0)).max() < spread.min() / 2


def test_prepare_generated_writes_an_index_with_ground_truth(tmp_path):
    idx = prepare_generated(tmp_path, 6, 3, 3, 2, 64, 80, seed=1)
    idx.save(tmp_path / "index.json")
    again = DatasetIndex.load(tmp_path / "index.json")
    assert [e.split for e in again.images] == ["train"] * 6 + ["val"] * 3
    assert again.classes == ["background", "disc", "square", "triangle"]
    e = again.images[4]
    img, sem = read_image(e), again.read_semantic(e)
    assert img.shape == (e.height, e.width, 3) and sem.shape == (e.height, e.width) and sem.max() <= 3


def test_folder_adapter_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        index_folder(tmp_path / "nope")
    with pytest.raises(UserError, match="no images"):
        index_folder(tmp_path)


@pytest.mark.skipif(not (SHARED / "coco-mini").is_dir(), reason="../shared/data/coco-mini not present")
def test_coco_adapter_on_coco_mini(tmp_path):
    idx = index_coco(SHARED / "coco-mini", ["train", "val"], tmp_path, limit=4)
    assert len(idx.split("train")) == 4 and len(idx.split("val")) == 4
    assert len(idx.classes) == 81
    e = idx.images[0]
    sem = idx.read_semantic(e)
    assert sem.shape == (e.height, e.width) and sem.max() <= 80 and (sem > 0).any()
    assert read_image(e).shape == (e.height, e.width, 3)


@pytest.mark.skipif(not (SHARED / "camvid").is_dir(), reason="../shared/data/camvid not present")
def test_camvid_adapter_maps_void_to_ignore():
    idx = index_camvid(SHARED / "camvid", ["val"], limit=2)
    assert len(idx.classes) == 11 and idx.classes[0] == "Sky"
    sem = idx.read_semantic(idx.images[0])
    assert set(np.unique(sem)) <= set(range(11)) | {255} and 11 not in sem


@pytest.mark.skipif(not (SHARED / "coco-mini").is_dir(), reason="../shared/data/coco-mini not present")
def test_folder_adapter_on_real_images():
    idx = index_folder(SHARED / "coco-mini" / "images", limit=5)
    assert len(idx.images) == 5 and not idx.has_ground_truth and idx.read_semantic(idx.images[0]) is None


def test_category_palette_puts_each_category_in_its_own_hue_band():
    import colorsys

    from unseg.data.generated import render_sample

    n = 4
    for i in range(12):
        image, semantic, _ = render_sample(i, 0, n, 3, 64, 80, palette="category")
        for c in np.unique(semantic[semantic > 0]):
            pixels = image[semantic == c].astype(np.float64) / 255.0
            hues = np.array([colorsys.rgb_to_hsv(*px)[0] for px in pixels[::7]])
            saturated = np.array([colorsys.rgb_to_hsv(*px)[1] for px in pixels[::7]]) > 0.3
            # the band of category c is centred at (c - 1) / n with half-width 0.3 / n (+ pixel noise)
            distance = np.abs((hues[saturated] - (c - 1) / n + 0.5) % 1.0 - 0.5)
            assert np.median(distance) < 0.3 / n + 0.03


def test_random_palette_is_the_default_and_unchanged():
    from unseg.data.generated import render_sample

    a, _, _ = render_sample(3, 0, 4, 3, 64, 80)
    b, _, _ = render_sample(3, 0, 4, 3, 64, 80, palette="random")
    c, _, _ = render_sample(3, 0, 4, 3, 64, 80, palette="category")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_folder_split_by_path_hash_is_stable_when_images_are_added(tmp_path):
    from PIL import Image

    for i in range(40):
        Image.new("RGB", (20, 20)).save(tmp_path / f"{i:02d}.png")
    before = {Path(e.file).name: e.split for e in index_folder(tmp_path, None, "train", "val", 0.25).images}
    assert 3 <= sum(s == "val" for s in before.values()) <= 18  # about a quarter
    Image.new("RGB", (20, 20)).save(tmp_path / "new.png")
    after = {Path(e.file).name: e.split for e in index_folder(tmp_path, None, "train", "val", 0.25).images}
    assert {k: after[k] for k in before} == before
    assert {e.split for e in index_folder(tmp_path).images} == {"train"}
    same = index_folder(tmp_path, None, "train", "train", 0.5)  # one split for both: nothing held out
    assert {e.split for e in same.images} == {"train"} and len(same.images) == 41
