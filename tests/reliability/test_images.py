"""Images are read as a viewer shows them, and prepare skips the files that cannot be read, by name."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from unseg.data import images
from unseg.data.images import ImageError, check_images, image_size, read_image

ROOT = Path(__file__).resolve().parents[2]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 128], [65535, 257 * 10]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    rgb = read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[..., 0], [[0, 128], [255, 10]])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_exif_orientation_is_applied_to_pixels_and_size(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red as stored
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    shown = read_image(path)
    assert shown.shape == (40, 20, 3) and image_size(path) == (40, 20)
    assert shown[:15, :, 0].mean() > 200 and shown[25:, :, 0].mean() < 50  # stored left half is on top


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[1, 1] = (200, 0, 0, 0)  # fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = read_image(path)
    np.testing.assert_array_equal(rgb[0, 0], (10, 20, 30))
    np.testing.assert_array_equal(rgb[1, 1], images.BACKGROUND)


def test_palette_cmyk_and_gray_become_rgb(tmp_path):
    base = Image.fromarray(np.full((4, 4, 3), (0, 128, 255), np.uint8))
    for mode in ("P", "CMYK", "L"):
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        base.convert(mode).save(path)
        out = read_image(path)
        assert out.shape == (4, 4, 3) and out.dtype == np.uint8


def test_truncated_non_image_and_oversized_files_raise_one_line(tmp_path, monkeypatch):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path in (truncated, text):
        with pytest.raises(ImageError) as err:
            read_image(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError, match="more than the 1000 allowed"):
        read_image(good)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own bomb guard: an error, not a traceback
    with pytest.raises(ImageError, match="cannot read image"):
        read_image(good)


def test_check_images_sorts_good_from_bad(tmp_path):
    ok, tiny = tmp_path / "ok.png", tmp_path / "tiny.png"
    Image.new("RGB", (30, 20)).save(ok)
    Image.new("RGB", (8, 40)).save(tiny)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    good, bad = check_images([ok, tiny, tmp_path / "bad.png"], min_side=16)
    assert good == {str(ok): (20, 30)}
    assert set(bad) == {str(tiny), str(tmp_path / "bad.png")} and "smaller than" in bad[str(tiny)]


def run_prepare(tmp_path: Path, folder: Path) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="folder", root=str(folder))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "-m",
        "stages.prepare",
        str(tmp_path / "prepared"),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_prepare_skips_bad_files_by_name_and_counts_them(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 32), (i * 50, 0, 0)).save(folder / f"img{i}.png")
    full = (folder / "img0.png").read_bytes()
    (folder / "broken.png").write_bytes(full[: len(full) // 2])
    proc = run_prepare(tmp_path, folder)
    assert proc.returncode == 0, proc.stderr
    skipped = json.loads((tmp_path / "prepared" / "skipped.json").read_text())
    assert skipped["count"] == 1 and list(skipped["images"]) == [str((folder / "broken.png").resolve())]
    assert f"skipping {(folder / 'broken.png').resolve()}" in proc.stdout + proc.stderr
    index = json.loads((tmp_path / "prepared" / "index.json").read_text())
    assert sorted(Path(e["file"]).name for e in index["images"]) == ["img0.png", "img1.png", "img2.png"]


def test_prepare_stops_in_one_line_when_no_image_is_readable(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_text("no")
    (folder / "b.png").write_text("no")
    proc = run_prepare(tmp_path, folder)
    assert proc.returncode == 2
    assert "none of the 2 images can be read" in proc.stderr and "Traceback" not in proc.stderr
