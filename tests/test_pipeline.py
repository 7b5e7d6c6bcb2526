"""End to end under DVC on a micro config: the stages run, a rerun does nothing, and a param change
reruns exactly the stage that reads it and what depends on it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO = {
    "data": {"n_train": 16, "n_val": 8, "min_side": 64, "max_side": 80, "video_sequences": 1, "video_frames": 4},
    "croc": {
        "reuse": None,
        "steps": 2,
        "batch_size": 4,
        "crop_size": 32,
        "out_dim": 64,
        "out_dim_c": 32,
        "head_hidden": 32,
        "head_bottleneck": 16,
        "ckpt_every": 1,
    },
    "features": {"short_side": 64, "batch_size": 8},
    "cluster": {"classes": 3, "batch_size": 8},
    # from scratch: the tiny profile's HSG init is one test's change (the committed HSG fits only its images)
    "distill": {
        "steps": 3,
        "lr_steps": [2],
        "warmup_steps": 1,
        "batch_size": 2,
        "ckpt_every": 2,
        "backbone_weights": None,
    },
    "deeplab": {"epochs": 1, "batch_size": 8, "crop_size": 64, "backbone_weights": None},
    "evaluate": {"raw_kmeans_pixels": 5000, "probe_epochs": 2},
    "hsg": {
        "reuse": None,
        "train": "auto",  # a placeholder unless a backbone_weights is hsg (one test sets one)
        "steps": 2,
        "stage1_steps": 1,
        "batch_size": 2,
        "crop_size": 64,
        "dim": 16,
        "fine_groups": 3,
        "coarse_groups": 2,
        "kmeans_grid": [2, 2],
        "kmeans_iters": 2,
        "warmup_steps": 1,
    },
}
STAGES = [
    "prepare",
    "pretrain_croc",
    "extract_features",
    "mine_masks",
    "pseudo_label",
    "pretrain_hsg",
    "distill_maskrcnn",
    "filter_confident",
    "train_deeplab",
    "self_train@1",
    "self_train@2",
    "self_train@3",
    "evaluate_backbone",
    "evaluate",
    "health",
]


def run(cmd, cwd, **kw):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def stale(repo: Path) -> dict:
    """``dvc status`` of the root pipeline without ``check_inputs``, which is always changed by design."""
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], repo))
    assert status.pop("check_inputs", ["always changed"]) == ["always changed"]
    return status


def stages_run(out: str) -> set[str]:
    """The stages a ``dvc repro`` log ran, without ``check_inputs`` (it runs on every repro)."""
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")} - {"check_inputs"}


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = deep_update(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def micro(overrides: dict) -> dict:
    """The micro config with ``overrides`` on top (MICRO itself untouched)."""
    return deep_update(json.loads(json.dumps(MICRO)), overrides)


def make_repo(repo: Path, overrides: dict, profile: Path = ROOT / "params.yaml") -> Path:
    """A copy of the project with ``overrides`` on top of ``profile`` as its params.yaml, after a full
    ``dvc repro``."""
    for name in ("dvc.yaml", "stages", "unseg", "configs", "checkpoints", "ceiling", "scripts"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    params = deep_update(yaml.safe_load(profile.read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo)
    run([sys.executable, "-m", "dvc", "repro"], repo, timeout=900)
    return repo


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("repo"), MICRO)


@pytest.mark.slow
def test_repro_writes_every_artifact(micro_repo):
    table1 = json.loads((micro_repo / "artifacts/metrics/table1.json").read_text())
    assert len(table1) >= 4
    for row in table1.values():
        assert 0 <= row["miou"] <= 1 and row["images"] == 8
    baselines = json.loads((micro_repo / "artifacts/metrics/baselines.json").read_text())
    assert len(baselines) == 3
    backbone = json.loads((micro_repo / "artifacts/metrics/backbone.json").read_text())
    assert set(backbone["pretrained"]) == {
        "dense_kmeans_miou",
        "linear_probe_miou",
        "davis_jf",
        "mask_fg_iou",
        "mask_fg_iou_top",
        "mask_fg_iou_bottom",
        "polarity_accuracy",
    }
    for scores in (backbone["pretrained"], backbone["random_init"]):
        assert all(0 <= scores[k] <= 1 for k in ("mask_fg_iou_top", "mask_fg_iou_bottom", "polarity_accuracy"))
    labels = json.loads((micro_repo / "artifacts/pseudo_labels/instances.json").read_text())
    assert len(labels["images"]) == 24 and len(labels["categories"]) == 3
    preds = json.loads((micro_repo / "artifacts/maskrcnn/predictions.json").read_text())
    assert all({"image_id", "category_id", "segmentation", "score"} <= set(p) for p in preds)
    assert (micro_repo / "artifacts/metrics/table.md").read_text().startswith("Split `val`")
    dag = run([sys.executable, "-m", "dvc", "dag", "--md"], micro_repo)
    assert all(stage in dag for stage in STAGES)


@pytest.mark.slow
def test_evaluate_writes_table1_bars_and_contact_sheets_as_dvc_plots(micro_repo, tmp_path):
    import csv

    from PIL import Image

    plots = micro_repo / "artifacts/plots/evaluate"
    table1 = json.loads((micro_repo / "artifacts/metrics/table1.json").read_text())
    bars = {r["row"]: float(r["miou"]) for r in csv.DictReader((plots / "table1.csv").open())}
    for name, row in table1.items():
        assert bars[name] == pytest.approx(100 * row["miou"], abs=0.005)  # one bar per Table-1 row, in %
    assert sum(name.startswith("baseline: ") for name in bars) == 3
    assert sorted(f.name for f in (plots / "sheets").iterdir()) == ["best.png", "worst.png"]
    for sheet in ("worst.png", "best.png"):  # 4 val images of 8 panels each, then the legend row
        assert Image.open(plots / "sheets" / sheet).size == (8 * 192, 5 * 208)
    out = run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(tmp_path / "html")], micro_repo)
    html = (tmp_path / "html" / "index.html").read_text()
    assert "index.html" in out and "Table 1 and baselines" in html and "maskrcnn_loss.csv" in html
    assert {f.name for f in (tmp_path / "html" / "static").iterdir()} >= {
        "workspace_artifacts_plots_evaluate_sheets_worst.png",
        "workspace_artifacts_plots_evaluate_sheets_best.png",
    }


@pytest.mark.slow
def test_second_repro_does_nothing_and_a_mining_param_reruns_only_its_subgraph(micro_repo):
    # the root pipeline only: the ceiling pipeline (ceiling/dvc.yaml) is not part of a plain `dvc repro`
    assert stale(micro_repo) == {}
    params = yaml.safe_load((micro_repo / "params.yaml").read_text())
    params["mining"]["topk_fraction"] = 0.3
    (micro_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    downstream = set(STAGES[STAGES.index("mine_masks") :])
    changed = set(stale(micro_repo))
    assert "mine_masks" in changed and changed <= downstream  # stages whose params changed
    out = run([sys.executable, "-m", "dvc", "repro"], micro_repo, timeout=600)
    ran = stages_run(out)
    assert "mine_masks" in ran and ran <= downstream


@pytest.mark.slow
def test_filter_tau_reruns_only_filter_deeplab_evaluate_and_health(micro_repo):
    params = yaml.safe_load((micro_repo / "params.yaml").read_text())
    params["filter"]["tau"] = 0.5
    (micro_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "dvc", "repro"], micro_repo, timeout=600)
    ran = stages_run(out)
    downstream = {"filter_confident", "train_deeplab", "self_train@1", "self_train@2", "evaluate", "health"}
    assert "filter_confident" in ran and ran <= downstream


@pytest.mark.slow
def test_the_ceiling_pipeline_trains_the_same_networks_on_ground_truth(micro_repo):
    out = run([sys.executable, "-m", "dvc", "repro", "ceiling/dvc.yaml"], micro_repo, timeout=600)
    ran = stages_run(out)
    stages = ("ground_truth", "ceiling_maskrcnn", "ceiling_deeplab", "evaluate_ceiling")
    assert ran == {f"ceiling/dvc.yaml:{s}" for s in stages}
    ceiling = json.loads((micro_repo / "artifacts/metrics/ceiling.json").read_text())
    assert {"deeplab_miou", "maskrcnn_ap50", "maskrcnn_miou"} <= set(ceiling) and ceiling["images"] == 8
    assert 0 <= ceiling["deeplab_miou"] <= 1 and 0 <= ceiling["maskrcnn_ap50"] <= 100
    gt = json.loads((micro_repo / "artifacts/ceiling/gt/instances.json").read_text())
    assert len(gt["images"]) == 16 and len(gt["categories"]) == 4  # the generated classes, not the 3 clusters
    # the label-free pipeline is untouched: nothing of the root dvc.yaml reruns
    assert stale(micro_repo) == {}


@pytest.mark.slow
def test_hsg_params_rerun_pretrain_hsg_and_its_consumers_never_the_vit_branch(micro_repo):
    """No backbone_weights is hsg: a changed HSG param reruns pretrain_hsg alone (its placeholder output keeps
    its bytes). deeplab.backbone_weights: hsg: HSG trains and DeepLab retrains on it; the ViT branch stays
    cached, and Mask R-CNN (it depends on the file, but starts from scratch) resumes from its final
    checkpoint and writes the same predictions."""
    params = yaml.safe_load((micro_repo / "params.yaml").read_text())
    params["hsg"]["steps"] = 3
    (micro_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run([sys.executable, "-m", "dvc", "repro"], micro_repo, timeout=600)) == {"pretrain_hsg"}
    params["deeplab"]["backbone_weights"] = "hsg"
    (micro_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    predictions = micro_repo / "artifacts/maskrcnn/predictions.json"
    before = predictions.read_bytes()
    out = run([sys.executable, "-m", "dvc", "repro"], micro_repo, timeout=600)
    ran = stages_run(out)
    consumers = {"pretrain_hsg", "distill_maskrcnn", "train_deeplab", "self_train@1", "self_train@2", "evaluate"}
    consumers |= {"self_train@3", "health"}
    assert {"pretrain_hsg", "train_deeplab"} <= ran <= consumers
    assert predictions.read_bytes() == before
    assert len((micro_repo / "artifacts/plots/hsg_loss.csv").read_text().splitlines()) == 1 + 3  # header, 3 steps
    assert stale(micro_repo) == {}


@pytest.mark.slow
def test_inspect_lists_artifacts_describes_them_and_draws_one_image(micro_repo, tmp_path):
    cmd = [sys.executable, "-m", "unseg", "inspect", "--root", str(micro_repo)]
    table = run(cmd, micro_repo)
    masks_row = next(line for line in table.splitlines() if line.startswith("artifacts/masks.zarr"))
    *_, images, digest = masks_row.split()
    assert "mine_masks" in masks_row and images == "24" and " ok " in masks_row
    assert len(digest) == 8 and int(digest, 16) >= 0  # the params digest of the run that wrote it
    described = run([*cmd, "artifacts/masks.zarr", "artifacts/maskrcnn/predictions.json"], micro_repo)
    assert "24 images" in described and "token_mask" in described and "COCO results" in described
    image_id = json.loads((micro_repo / "data/prepared/index.json").read_text())["images"][-1]["id"]
    out = tmp_path / "show.png"
    run([*cmd, "show", str(image_id), "-o", str(out)], micro_repo)
    from PIL import Image

    assert Image.open(out).size == (4 * 192, 3 * 208)  # 8 panels (input .. ground truth) and the legend
    grid = tmp_path / "grid.png"
    run([*cmd, "grid", "--n", "3", "--sort", "worst", "-o", str(grid)], micro_repo)
    assert Image.open(grid).size == (8 * 192, 4 * 208)  # 3 images of 8 panels, then the legend
    missing = subprocess.run([*cmd, "artifacts/nope.zarr"], cwd=micro_repo, capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    params_file = micro_repo / "params.yaml"
    original = params_file.read_text()
    changed = yaml.safe_load(original)
    changed["filter"]["tau"] = 0.77  # stale from filter_confident on, not rerun
    params_file.write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        stale = subprocess.run([*cmd, "show", str(image_id), "-o", str(out)], cwd=micro_repo, capture_output=True,
                               text=True)  # fmt: skip
    finally:
        params_file.write_text(original)
    warnings = [line for line in stale.stderr.splitlines() if "warning" in line]
    assert stale.returncode == 0 and len(warnings) == 1
    assert "filter_confident" in warnings[0] and "mine_masks" not in warnings[0]  # dvc status: the stage whose
    # params changed (what follows it is stale through its outputs, which dvc status reports once they change)


@pytest.mark.slow
def test_unseg_segment_reproduces_train_deeplab_and_names_the_matched_classes(micro_repo, tmp_path):
    """The workspace's DeepLab applied by ``unseg segment`` to the validation images gives train_deeplab's own
    predictions pixel for pixel; ``--names matched`` uses evaluate's Hungarian match; ``--instances`` writes
    COCO results and one instance PNG per image."""
    import numpy as np
    from PIL import Image

    from unseg import store

    entries = [e for e in json.loads((micro_repo / "data/prepared/index.json").read_text())["images"]]
    val = [e for e in entries if e["split"] == "val"]
    cmd = [sys.executable, "-m", "unseg", "segment", *[e["file"] for e in val]]
    run([*cmd, "-o", str(tmp_path / "ids")], micro_repo)
    predictions = store.RaggedStore(micro_repo / "artifacts/deeplab/predictions.zarr")
    row_of = {int(i): r for r, i in enumerate(predictions.read("image_id"))}
    for e in val:
        labels = np.asarray(Image.open(tmp_path / "ids" / f"{Path(e['file']).stem}.png"))
        np.testing.assert_array_equal(labels, store.read_semantic_map(predictions, row_of[e["id"]]))
    classes = json.loads((micro_repo / "artifacts/metrics/cluster_classes.json").read_text())
    names = {c["id"]: c["class"] or f"cluster {c['id']}" for c in classes["clusters"]}
    run([*cmd, "-o", str(tmp_path / "named"), "--names", "matched", "--format", "json"], micro_repo)
    by_ids, by_names = (json.loads((tmp_path / d / "segments.json").read_text())["images"] for d in ("ids", "named"))
    for ids, named in zip(by_ids, by_names, strict=True):
        assert named["classes"] == [names[c] for c in ids["classes"]]
    run([*cmd, "-o", str(tmp_path / "inst"), "--instances"], micro_repo)
    results = json.loads((tmp_path / "inst" / "instances.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(range(1, len(val) + 1))
    assert len(list((tmp_path / "inst").glob("*.instances.png"))) == len(val)


@pytest.mark.slow
def test_queued_experiments_rerun_only_the_stages_their_param_changes(micro_repo):
    """`dvc exp run --queue` of two filter.tau values, then `dvc queue start`: each experiment's temporary copy
    runs filter_confident and what follows it, never the training stages upstream (no scratch out makes them
    look changed there)."""
    import time

    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run([*git, "add", "-A"], micro_repo)
    run([*git, "commit", "-qm", "the micro run"], micro_repo)
    dvc = [sys.executable, "-m", "dvc"]
    for tau in (0.4, 0.6):
        run([*dvc, "exp", "run", "--queue", "-n", f"tau-{tau}", "-S", f"filter.tau={tau}"], micro_repo)
    run([*dvc, "queue", "start", "-j", "1"], micro_repo)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run([*dvc, "queue", "status"], micro_repo)
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    upstream = set(STAGES[: STAGES.index("filter_confident")]) | {"evaluate_backbone"}
    for tau in (0.4, 0.6):
        ran = stages_run(run([*dvc, "queue", "logs", f"tau-{tau}"], micro_repo))
        assert {"filter_confident", "train_deeplab", "self_train@1", "evaluate", "health"} <= ran, ran
        assert not ran & upstream, f"a queued filter.tau experiment reran {sorted(ran & upstream)}"
