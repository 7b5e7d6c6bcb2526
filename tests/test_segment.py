"""unseg segment and the model bundle: labels equal the pipeline's own prediction function, every output is
written, odd and bad images are skipped and counted, an interrupted run resumes to the same files, and user
mistakes are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unseg
from unseg.deeplab import architecture_of, build_deeplab, predict_semantic
from unseg.errors import UserError
from unseg.models.bundle import Preprocess, make_bundle, read_bundle, save_bundle
from unseg.params import parse_params
from unseg.segment import PARTIAL, collect_images, segment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> Path:
    """A DeepLab of the tiny profile's architecture, random weights and BatchNorm statistics, as a bundle."""
    torch.manual_seed(0)
    deeplab = parse_params({}).deeplab
    model = build_deeplab(4, **architecture_of(deeplab)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    prep = Preprocess(input_size=64, output_stride=deeplab.output_stride)
    save_bundle(
        make_bundle(
            "deeplab",
            model=model,
            architecture=architecture_of(deeplab),
            num_classes=4,
            preprocess=prep,
            params_digest="test",
        ),
        path,
    )
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five images of different kinds in a folder tree, a text file, and a truncated PNG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (70, 50, 3), np.uint8)).save(root / "sub" / "b.jpg", quality=95)
    Image.fromarray(rng.integers(0, 65535, (40, 40), np.uint16)).save(root / "sub" / "c16.png")  # 16-bit grey
    Image.fromarray(rng.integers(0, 255, (36, 60, 4), np.uint8), mode="RGBA").save(root / "d.png")  # alpha
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(root / "e.webp")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes((root / "a.png").read_bytes()[:100])
    return root


def test_a_folder_gives_one_label_png_overlay_and_record_per_image_equal_to_the_pipeline(bundle_path, photos, tmp_path):
    out = tmp_path / "out"
    summary = segment([photos], out, model_path=bundle_path, device="cpu", batch_size=2)
    assert summary.segmented == 5 and summary.skipped == [str(photos / "broken.png")]
    assert summary.passed_over == [str(photos / "notes.txt")]
    index = json.loads((out / "segments.json").read_text())["images"]
    assert [r["name"] for r in index] == ["a", "d", "e", "sub/b", "sub/c16"]  # sorted, names under the folder
    model, prep = unseg.load_model(bundle_path)
    for rec in index:
        label = Image.open(out / f"{rec['name']}.png")
        assert label.mode == "P" and label.size == (rec["width"], rec["height"])
        labels = np.asarray(label)
        assert Image.open(out / f"{rec['name']}.overlay.jpg").size == label.size
        from unseg.data.images import read_image

        image = torch.from_numpy(read_image(rec["image"])).permute(2, 0, 1)
        expected = predict_semantic(model, image, torch.device("cpu"), input_size=prep.input_size)
        np.testing.assert_array_equal(labels, expected.numpy())  # what train_deeplab writes, pixel for pixel
        assert rec["classes"] == sorted(int(c) for c in np.unique(labels))
        assert 1 / 4 <= rec["mean_confidence"] <= 1
    assert not (out / PARTIAL).exists()


def test_an_interrupted_run_resumes_to_the_same_files(bundle_path, photos, tmp_path, monkeypatch):
    from unseg import segment as S

    segment([photos], tmp_path / "once", model_path=bundle_path, device="cpu", batch_size=2)
    real, calls = S.Writer.write, []

    def dies_after_two(self, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        real(self, *args)

    monkeypatch.setattr(S.Writer, "write", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        segment([photos], tmp_path / "again", model_path=bundle_path, device="cpu", batch_size=2)
    monkeypatch.undo()
    assert not (tmp_path / "again" / "segments.json").exists()  # no index claims a finished run
    summary = segment([photos], tmp_path / "again", model_path=bundle_path, device="cpu", batch_size=2)
    assert summary.resumed == 2 and summary.segmented == 3
    once = sorted(p.relative_to(tmp_path / "once") for p in (tmp_path / "once").rglob("*") if p.is_file())
    again = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert once == again
    for name in once:
        if name.suffix == ".png":
            assert np.array_equal(
                np.asarray(Image.open(tmp_path / "once" / name)), np.asarray(Image.open(tmp_path / "again" / name))
            ), name
    assert (tmp_path / "once" / "segments.json").read_text() == (tmp_path / "again" / "segments.json").read_text()
    other = segment([photos], tmp_path / "again", model_path=bundle_path, device="cpu", formats=("label", "json"))
    assert other.resumed == 0 and other.segmented == 5  # another run's outputs are redone, not taken as done


def test_formats_crf_and_matched_names(bundle_path, photos, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    out = tmp_path / "o"
    segment(
        [photos / "a.png"],
        out,
        model_path=bundle_path,
        device="cpu",
        formats=("label", "json"),
        crf=True,
        class_names=["background", "road", "sky", "tree"],
    )
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "segments.json"]
    rec = json.loads((out / "segments.json").read_text())["images"][0]
    assert set(rec["classes"]) <= {"background", "road", "sky", "tree"}


def test_globs_and_files_are_sources_too(photos):
    found, passed = collect_images([str(photos / "*.png"), photos / "sub" / "b.jpg"])
    assert [s.name for s in found] == ["a", "broken", "d", "b"] and passed == []


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [sys.executable, "-m", "unseg", "segment", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr


@pytest.mark.slow
def test_user_mistakes_are_one_line_and_write_nothing(bundle_path, photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run_cli(str(photos), "-o", "o", cwd=tmp_path), "make repro")  # no workspace model
    one_line_error(run_cli(str(photos), "-o", "o", "--model", "nope.pt", cwd=tmp_path), "nope.pt")
    one_line_error(run_cli(str(empty), "-o", "o", "--model", str(bundle_path), cwd=tmp_path), "no image files")
    one_line_error(
        run_cli(str(photos), "-o", "o", "--model", str(bundle_path), "--instances", cwd=tmp_path),
        "a deeplab model, not a maskrcnn one",
    )
    old = tmp_path / "old.pt"
    torch.save({"model": {}, "num_classes": 3}, old)  # what train_deeplab wrote before bundles
    one_line_error(run_cli(str(photos), "-o", "o", "--model", str(old), cwd=tmp_path), "not an unseg model bundle")
    (tmp_path / "file").write_text("x")
    one_line_error(run_cli(str(photos), "-o", "file/out", "--model", str(bundle_path), cwd=tmp_path), "cannot write")
    assert not (tmp_path / "o").exists()
    ok = run_cli(str(photos), "-o", "o", "--model", str(bundle_path), "--device", "cpu", cwd=tmp_path)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr
    assert "5 images" in ok.stdout and "1 unreadable skipped" in ok.stdout and "1 non-image" in ok.stdout
    assert ok.stderr.count("skipped") == 1 and "broken.png" in ok.stderr


def test_a_bundle_of_another_architecture_is_one_line(bundle_path, tmp_path):
    bundle = read_bundle(bundle_path)
    bundle["architecture"] = {**bundle["architecture"], "backbone": "resnet34"}
    torch.save(bundle, tmp_path / "other.pt")
    with pytest.raises(UserError, match="do not fit") as err:
        unseg.load_model(tmp_path / "other.pt")
    assert "\n" not in str(err.value)


def test_the_exported_deeplab_gives_the_eager_argmax(bundle_path, photos, tmp_path):
    from unseg.data.images import read_image
    from unseg.export import export_deeplab

    model, prep = unseg.load_model(bundle_path)
    program = torch.export.load(export_deeplab(bundle_path, tmp_path / "deeplab.pt2")).module()
    for name in ("a.png", "d.png", "e.webp"):
        x = prep.tensor(read_image(photos / name))
        with torch.no_grad():
            assert torch.equal(program(x).argmax(1), model(x).argmax(1)), name


def test_the_onnx_deeplab_gives_the_eager_argmax(bundle_path, photos, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install onnx)")
    ort = pytest.importorskip("onnxruntime", reason="checking the graph needs onnxruntime")
    from unseg.data.images import read_image
    from unseg.export import export_deeplab

    model, prep = unseg.load_model(bundle_path)
    session = ort.InferenceSession(str(export_deeplab(bundle_path, tmp_path / "deeplab.onnx", "onnx")))
    x = torch.cat([prep.tensor(read_image(photos / name)) for name in ("a.png", "d.png", "e.webp")])
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert np.array_equal(logits.argmax(1), model(x).argmax(1).numpy())
