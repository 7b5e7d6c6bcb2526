"""The second hostile pass (issue 36) as a table: each case a user or a hostile tester tried, and what they get.

Every case ends in one line naming the key, file or store at fault (or in the correct behaviour), never in
a traceback and never in a silently wrong result. The README's "When something is wrong" section quotes its count.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from unseg.errors import UserError
from unseg.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def tiny() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def without(section: str, key: str | None = None) -> dict:
    raw = tiny()
    if key is None:
        del raw[section]
    else:
        del raw[section][key]
    return raw


def changed(section: str, key: str, value) -> dict:
    raw = tiny()
    raw[section][key] = value
    return raw


# (case, params as written, the one line a stage stops with)
PARAMS_CASES = [
    ("filter.tau is NaN", changed("filter", "tau", math.nan), "filter.tau = nan: must be a finite number"),
    ("deeplab.lr is +inf", changed("deeplab", "lr", math.inf), "deeplab.lr = inf: must be a finite number"),
    ("croc.lr is NaN", changed("croc", "lr", math.nan), "croc.lr = nan: must be a finite number"),
    ("distill.clip_grad is NaN", changed("distill", "clip_grad", math.nan), "clip_grad = nan: must be a finite"),
    ("a NaN inside a list", changed("hsg", "lr_milestones", [0.3, math.nan]), "lr_milestones = [0.3, nan]: must hold"),
    ("deeplab.epochs = 10^9", changed("deeplab", "epochs", 10**9), "epochs = 1000000000: must be in [1, 10000]"),
    ("croc.steps = 10^12", changed("croc", "steps", 10**12), "croc.steps = 1000000000000: must be in [0, 1e+07]"),
    ("features.short_side = 10^5", changed("features", "short_side", 10**5), "short_side = 100000: must be in"),
    ("a seed past 2^31", changed("cluster", "seed", 2**40), "cluster.seed = 1099511627776: must be <= 2147483647"),
    ("section filter deleted", without("filter"), "section filter is missing"),
    ("key filter.tau deleted", without("filter", "tau"), "filter.tau is missing"),
    ("section filter emptied", {**tiny(), "filter": None}, "filter.tau is missing"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "raw", "message"), PARAMS_CASES, ids=[c[0] for c in PARAMS_CASES])
def test_params_that_are_accepted_silently_now_stop_in_one_line(tmp_path, case, raw, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert message in str(err.value) and "\n" not in str(err.value), case


def test_a_stage_run_directly_rejects_a_duplicate_key_as_dvc_does(tmp_path):
    """PyYAML keeps the last of two equal keys; every stage reads params through one strict reader instead."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("filter:"))
    text = "\n".join([*lines[: at + 1], "  tau: 0.9", *lines[at + 1 :]]) + "\n"
    (tmp_path / "params.yaml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.check_inputs", str(tmp_path / "listing.json"), "--params", "params.yaml"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("check_inputs: error: params.yaml: not valid YAML: key 'tau' is given twice (lines ")
    assert "\n" not in line and not (tmp_path / "listing.json").exists()


def test_a_symlink_loop_in_data_root_is_one_line(tmp_path):
    from unseg.data.listing import dataset_listing

    (tmp_path / "photos" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "photos" / "a" / "x.png")
    (tmp_path / "photos" / "a" / "up").symlink_to("..")
    (tmp_path / "photos" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a broken link: no file, left out
    with pytest.raises(UserError, match=r"photos/a/up links back to a folder that contains it \(a link loop\)"):
        dataset_listing("folder", tmp_path / "photos")
    (tmp_path / "photos" / "a" / "up").unlink()
    assert [f[0] for f in dataset_listing("folder", tmp_path / "photos")["files"]] == ["a/x.png"]


def test_data_root_pointing_at_a_file_says_so(tmp_path):
    from unseg.data.index import index_folder

    (tmp_path / "photo.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="photo.jpg is a file, not a folder"):
        index_folder(tmp_path / "photo.jpg")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["grid", "--n", "0"], "grid takes --n N (at least 1 image) and no other word: --n 0"),
        (["grid", "--n", "-2"], "--n -2"),
        (["show", "abc"], "show needs one image id, a number (`unseg inspect grid` prints them): 'abc' is not"),
        (["show"], "no image id given"),
    ],
)
def test_inspect_arguments_out_of_range_are_one_line(tmp_path, capsys, argv, message):
    from unseg.inspection import main

    assert main(["inspect", *argv, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unseg inspect: error: ") and message in err and "\n" not in err


def small_store(path: Path) -> Path:
    from unseg.store import write_ragged

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, 16)).astype(np.float32)
    return write_ragged(path, np.full(10, 30), {"keys": keys, "image_id": np.arange(10)}, {"keys"}, attrs={})


def shard_file(store: Path, array: str) -> Path:
    return next(p for p in sorted((store / array).rglob("*")) if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("where", ["chunk data", "shard index", "metadata"])
def test_a_corrupted_store_stops_the_reader_in_one_line_naming_it(tmp_path, where):
    from unseg.store import CorruptStore, RaggedStore

    store = small_store(tmp_path / "features.zarr")
    reference = RaggedStore(store).read("keys")
    target = store / "zarr.json" if where == "metadata" else shard_file(store, "keys")
    data = bytearray(target.read_bytes())
    at = {"chunk data": 40, "shard index": len(data) - 12, "metadata": 10}[where]
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])  # 16 flipped bytes
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptStore) as err:
        values = RaggedStore(store).read("keys")
        assert np.array_equal(values, reference), "read changed values without a word"
    assert str(store) in str(err.value) and "dvc checkout" in str(err.value) and "\n" not in str(err.value)


def test_a_coco_file_name_outside_data_root_is_refused(tmp_path):
    from unseg.data.index import index_coco

    root = tmp_path / "coco"
    (root / "images" / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    gt = {"images": [{"id": 1, "file_name": "../../../photos/x.jpg", "height": 8, "width": 8}], "annotations": [],
          "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (root / "annotations" / "instances_val.json").write_text(json.dumps(gt))
    with pytest.raises(UserError, match=r"file_name '../../../photos/x.jpg' lies outside data.root"):
        index_coco(root, ["val"], tmp_path / "out")


def test_gifs_are_read_and_files_that_are_not_images_are_named(tmp_path):
    from unseg.data.index import index_folder, not_images

    Image.new("P", (40, 30), 3).save(tmp_path / "anim.gif")
    Image.new("RGB", (40, 30)).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "clip.mov").write_bytes(b"\0")
    assert sorted(Path(e.file).name for e in index_folder(tmp_path).images) == ["anim.gif", "b.png"]
    assert not_images(tmp_path) == ["clip.mov", "notes.txt"]


def test_an_image_over_the_pixel_or_aspect_budget_is_skipped_by_name(tmp_path, monkeypatch):
    from unseg.data import images

    Image.new("RGB", (64, 48)).save(tmp_path / "ok.png")
    Image.new("RGB", (16, 400)).save(tmp_path / "strip.png")  # 25:1
    Image.new("RGB", (200, 150)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "BUDGET_PIXELS", 20_000)
    good, bad = images.check_images([tmp_path / n for n in ("ok.png", "strip.png", "big.png")], min_side=16)
    assert list(good) == [str(tmp_path / "ok.png")]
    assert "16x400 pixels, over the budget" in bad[str(tmp_path / "strip.png")]
    assert "200x150 pixels, over the budget" in bad[str(tmp_path / "big.png")]


def test_health_verdict_fails_on_a_random_init_vit_and_passes_the_tiny_run(tmp_path):
    """The masks a random-init ViT's q/k give (what a 2-step CrOC gives) separate nothing: the verdict says so."""
    import torch

    from unseg.data.index import prepare_generated
    from unseg.evaluation.health import mask_health, verdict
    from unseg.features import batch_features, forward_images, geometries
    from unseg.mining import MiningConfig, mine_masks
    from unseg.models.vit import create_vit

    index = prepare_generated(tmp_path, 8, 0, 3, 2, 96, 96, seed=0)
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", 8, 4, stem="conv").eval()
    with torch.no_grad():
        batch = next(forward_images(vit, index.images, geometries(index.images, 96, 8, "pad"), 8, torch.device("cpu")))
    feats, grid = batch_features(batch.out), tuple(batch.out.grid)
    n = grid[0] * grid[1]
    keys = torch.from_numpy(feats.keys).view(8, n, -1).float()
    mined = mine_masks(torch.from_numpy(feats.cls_logits).view(8, n, -1), keys, grid, MiningConfig())
    figures = {"mined_masks": mask_health((mined.label[i].reshape(grid) > 0).numpy() for i in range(8))}
    broken = verdict(figures, detections_per_image=20)
    assert broken["verdict"] == "failed" and len(broken["failed"]) == 2
    assert "mined masks cover 100.0 % of each image" in broken["failed"][0]
    assert "touch the image border" in broken["failed"][1]
    committed = json.loads((ROOT / "artifacts/metrics/health.json").read_text())  # the tiny profile's run
    assert verdict(committed, load_params(ROOT / "params.yaml").distill.detections_per_image)["verdict"] == "ok"
