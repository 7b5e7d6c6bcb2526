"""distill.backend: detectron2 for real: it trains and its loss falls, a kill -9 resumes to the uninterrupted
weights, its predictions are COCO results that filter_confident takes, torchvision weights convert exactly,
and the pipeline runs on it (one process and two under UNSEG_TORCHRUN). Skipped when detectron2 does not
load (``make detectron2`` installs it)."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from unseg.distill.detectron2_config import require_detectron2
from unseg.errors import UserError

try:
    require_detectron2()
    MISSING = ""
except UserError as err:
    MISSING = str(err)
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING)

sys.path.insert(0, str(Path(__file__).parent))
import _detectron2_worker as worker  # noqa: E402
from test_maskrcnn import synthetic_coco  # noqa: E402
from test_pipeline import make_repo, micro, run, stages_run  # noqa: E402

WORKER = str(Path(__file__).parent / "_detectron2_worker.py")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """150 steps on three images (a red rectangle of category 3 and a blue disc of category 7 in each)."""
    root = tmp_path_factory.mktemp("d2")
    json_path, _ = synthetic_coco(root)
    return json_path, worker.train(json_path, root / "ckpt", steps=150, ckpt_every=50), root / "ckpt"


def losses(path: Path) -> list[float]:
    with open(path) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_loss_falls_and_each_object_is_found_with_its_category(trained):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from unseg.coco import decode_segmentation

    json_path, done, ckpt = trained
    loss = losses(ckpt / "loss.csv")
    assert len(loss) == 150 and np.isfinite(loss).all() and done.steps_run == 150
    assert np.mean(loss[-10:]) < 0.6 * np.mean(loss[:5]), (loss[:5], loss[-10:])
    gt = COCO(str(json_path))
    for ann in gt.loadAnns(gt.getAnnIds()):
        truth = decode_segmentation(ann["segmentation"], 64, 80)
        same = [p for p in done.predictions if p["image_id"] == ann["image_id"]]
        same = [decode_segmentation(p["segmentation"], 64, 80) for p in same if p["category_id"] == ann["category_id"]]
        assert max((m & truth).sum() / (m | truth).sum() for m in same) > 0.5, ann["id"]
    evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(done.predictions)), "segm")  # loadRes edits its input
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[1] > 0.3  # mask AP50 on the training images


@pytest.mark.slow
def test_predictions_are_the_shared_coco_results_that_filter_confident_takes(trained):
    from unseg.coco import decode_rle, group_by_image, mask_bbox
    from unseg.filtering import filter_image

    _, done, _ = trained
    preds = done.predictions
    assert preds and [p["id"] for p in preds] == list(range(1, len(preds) + 1))
    for p in preds:
        mask = decode_rle(p["segmentation"])
        assert mask.shape == (64, 80) and mask.any() and p["bbox"] == mask_bbox(mask)
        assert p["category_id"] in (3, 7) and p["score"] >= 0.05 and p["image_id"] in (1, 2, 3, 4)
    for image_id, mine in group_by_image(preds).items():
        scores = [p["score"] for p in mine]
        assert scores == sorted(scores, reverse=True)
        zero_based = [{**p, "category_id": p["category_id"] - 1} for p in mine]  # as stages/filter_confident.py
        label, kept = filter_image(zero_based, 64, 80, tau=0.1)
        assert kept and label.shape == (64, 80) and set(np.unique(label)) <= {0, 3, 7}, image_id


@pytest.mark.slow
def test_the_model_bundle_rebuilds_the_network_and_its_predictions_without_params(trained, tmp_path):
    import unseg
    from unseg.distill.detectron2_backend import build_cfg, predict_detectron2
    from unseg.models.bundle import Preprocess, make_bundle, read_bundle, save_bundle

    json_path, done, _ = trained
    bundle = make_bundle(
        "maskrcnn",
        model=done.model,
        architecture=done.config,
        num_classes=2,
        preprocess=Preprocess(short_side=64),
        params_digest="x",
        backend="detectron2",
        category_ids=done.category_ids,
    )  # as stages/distill_maskrcnn.py writes it
    save_bundle(bundle, tmp_path / "model.pt")
    assert read_bundle(tmp_path / "model.pt")["category_ids"] == [3, 7]
    model, prep = unseg.load_model(tmp_path / "model.pt")  # weights_only
    assert prep.short_side == 64 and not model.training
    images = sorted((int(p.stem), p) for p in json_path.parent.glob("*.png"))
    again = predict_detectron2(model, build_cfg(done.config), images, category_ids=done.category_ids, batch_size=2)
    assert again == done.predictions


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    json_path, _ = synthetic_coco(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    steps, every = "24", "4"
    subprocess.run([sys.executable, WORKER, str(json_path), str(tmp_path / "once"), steps, every], env=env, check=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, WORKER, str(json_path), str(killed), steps, every], env=env)
    deadline = time.time() + 300
    while not list(killed.glob("model_0*.pth")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(killed.glob("model_0*.pth")) and not (killed / "model_final.pth").exists(), "not killed mid-run"
    subprocess.run([sys.executable, WORKER, str(json_path), str(killed), steps, every], env=env, check=True)
    once, resumed = torch.load(tmp_path / "once" / "final.pt"), torch.load(killed / "final.pt")
    assert once.keys() == resumed.keys() and all(torch.equal(once[k], resumed[k]) for k in once)
    assert (killed / "loss.csv").read_text() == (tmp_path / "once" / "loss.csv").read_text()
    assert (killed / "predictions.json").read_text() == (tmp_path / "once" / "predictions.json").read_text()
    (killed / "predictions.json").unlink()  # a kill after training, while predicting: the rerun only predicts
    subprocess.run([sys.executable, WORKER, str(json_path), str(killed), steps, every], env=env, check=True)
    assert all(torch.equal(once[k], v) for k, v in torch.load(killed / "final.pt").items())
    assert (killed / "loss.csv").read_text() == (tmp_path / "once" / "loss.csv").read_text()
    assert (killed / "predictions.json").read_text() == (tmp_path / "once" / "predictions.json").read_text()


@pytest.mark.parametrize(("depth", "fpn"), [("resnet18", True), ("resnet50", False)])
def test_converted_torchvision_weights_give_the_same_features(tmp_path, depth, fpn):
    """A torchvision ResNet (random weights and BatchNorm statistics) and detectron2's trunk loaded from its
    checkpoint agree on one image: every stage's output (C4: res5 is the box head's)."""
    from detectron2.modeling import build_model

    from unseg.distill.detectron2_backend import build_cfg, load_backbone
    from unseg.distill.detectron2_config import detectron2_config
    from unseg.models.resnet import create_resnet
    from unseg.params import parse_params

    torch.manual_seed(0)
    resnet = create_resnet(depth).eval()
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    torch.save({"state_dict": {"module.encoder_q." + k: v for k, v in resnet.state_dict().items()}}, tmp_path / "w.pth")
    distill = parse_params({"distill": {"backbone": depth, "fpn": fpn}}).distill
    model = build_model(build_cfg(detectron2_config(distill, num_classes=2))).eval()
    report = load_backbone(model, tmp_path / "w.pth", fpn=fpn)
    assert report.endswith("not in the checkpoint: none"), report
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(image))))
        expected = {}
        for k in (1, 2, 3, 4):
            x = expected[f"res{k + 1}"] = getattr(resnet, f"layer{k}")(x)
        if fpn:
            got = model.backbone.bottom_up(image)
        else:
            got = model.backbone(image)
            got["res5"] = model.roi_heads.res5[:3](got["res4"])  # the bottleneck blocks, before MoCo's extra norm
    for name in ("res2", "res3", "res4", "res5") if fpn else ("res4", "res5"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


def test_the_committed_hsg_resnet_fills_the_whole_tiny_trunk():
    """``backbone_weights: hsg`` (pretrain_hsg's file has this format): every trunk tensor comes from it."""
    from detectron2.modeling import build_model

    from unseg.distill.detectron2_backend import build_cfg, load_backbone
    from unseg.distill.detectron2_config import detectron2_config
    from unseg.models.resnet import create_resnet
    from unseg.params import parse_params

    model = build_model(build_cfg(detectron2_config(parse_params({}).distill, num_classes=2)))
    before = model.backbone.bottom_up.res4[0].conv1.weight.clone()
    report = load_backbone(model, ROOT / "checkpoints" / "hsg_tiny.pth", fpn=True)
    trunk = [k for k in create_resnet("resnet18").state_dict() if not k.startswith("fc.") and "num_batches" not in k]
    assert f"{len(trunk)} tensors loaded" in report and report.endswith("not in the checkpoint: none"), report
    assert not torch.equal(before, model.backbone.bottom_up.res4[0].conv1.weight)


def test_a_checkpoint_of_another_depth_is_one_line(tmp_path):
    from detectron2.modeling import build_model

    from unseg.distill.detectron2_backend import build_cfg, load_backbone
    from unseg.distill.detectron2_config import detectron2_config
    from unseg.models.resnet import create_resnet
    from unseg.params import parse_params

    torch.save(create_resnet("resnet34").state_dict(), tmp_path / "r34.pth")
    model = build_model(build_cfg(detectron2_config(parse_params({}).distill, num_classes=2)))  # resnet18
    with pytest.raises(UserError, match="another ResNet depth|no place") as err:
        load_backbone(model, tmp_path / "r34.pth", fpn=True)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the pipeline on detectron2

D2_MICRO = {"distill": {"backend": "detectron2", "steps": 4, "lr_steps": [3], "ckpt_every": 2}}


@pytest.fixture(scope="module")
def d2_repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("d2repo"), micro(D2_MICRO))


@pytest.mark.slow
def test_the_pipeline_runs_on_detectron2_and_its_predictions_flow_downstream(d2_repo):
    table1 = json.loads((d2_repo / "artifacts/metrics/table1.json").read_text())
    assert {"2 + Mask R-CNN", "3 + confidence filter", "4 + DeepLab-v3"} <= set(table1)
    assert all(0 <= row["miou"] <= 1 for row in table1.values())
    bundle = torch.load(d2_repo / "artifacts/maskrcnn/model.pt", weights_only=True)
    assert bundle["backend"] == "detectron2" and bundle["architecture"]["MODEL.RESNETS.DEPTH"] == 18
    log = (d2_repo / "artifacts/plots/maskrcnn_loss.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,") and len(log) == 1 + 4


@pytest.mark.slow
def test_two_processes_under_unseg_torchrun(d2_repo):
    """The same launcher as the torchvision backend: 2 gloo processes train one model and rank 0 predicts."""
    preds = d2_repo / "artifacts/maskrcnn/predictions.json"
    subprocess.run(["rm", "-rf", str(d2_repo / "artifacts/scratch/maskrcnn")], check=True)  # train again, not resume
    env_before = os.environ.get("UNSEG_TORCHRUN")
    os.environ["UNSEG_TORCHRUN"] = "--standalone --nproc_per_node 2"
    try:
        out = run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "distill_maskrcnn"], d2_repo, timeout=600)
    finally:
        os.environ.pop("UNSEG_TORCHRUN") if env_before is None else os.environ.update(UNSEG_TORCHRUN=env_before)
    assert stages_run(out) == {"distill_maskrcnn"}
    results = json.loads(preds.read_text())
    assert results and all({"image_id", "category_id", "segmentation", "score"} <= set(r) for r in results)
    assert len((d2_repo / "artifacts/plots/maskrcnn_loss.csv").read_text().splitlines()) == 1 + 4
