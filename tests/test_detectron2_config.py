"""unseg.distill.detectron2_config: the params -> detectron2 config translation of each profile, the weight
renaming, and the one-line errors when detectron2 is missing or does not load. No detectron2 needed."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from unseg.distill.detectron2_config import convert_resnet_state, detectron2_config, require_detectron2
from unseg.errors import UserError
from unseg.models.resnet import create_resnet
from unseg.params import parse_params

ROOT = Path(__file__).resolve().parents[1]


def profile(name: str):
    return parse_params(yaml.safe_load((ROOT / name).read_text()))


def test_paper_profile_is_r50_c4_with_the_papers_schedule():
    cfg = detectron2_config(profile("configs/paper.yaml").distill, num_classes=20, device="cuda")
    assert cfg["SOLVER.BASE_LR"] == 0.02 and cfg["SOLVER.IMS_PER_BATCH"] == 16
    assert cfg["SOLVER.STEPS"] == (20000, 22000) and cfg["SOLVER.MAX_ITER"] == 24000
    assert cfg["SOLVER.WARMUP_ITERS"] == 100 and cfg["SOLVER.GAMMA"] == 0.1 and cfg["SOLVER.WARMUP_FACTOR"] == 0.001
    assert cfg["MODEL.BACKBONE.NAME"] == "build_resnet_backbone" and cfg["MODEL.RESNETS.DEPTH"] == 50
    assert cfg["MODEL.BACKBONE.FREEZE_AT"] == 2  # stem and res2: "the first two stages"
    assert cfg["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"  # C4: res5 (+ MoCo's norm) is the box head
    assert cfg["MODEL.RESNETS.OUT_FEATURES"] == ["res4"] == cfg["MODEL.RPN.IN_FEATURES"]
    assert cfg["MODEL.ANCHOR_GENERATOR.SIZES"] == [[32, 64, 128, 256, 512]]
    assert cfg["MODEL.MASK_ON"] is True and cfg["MODEL.ROI_HEADS.NUM_CLASSES"] == 20
    assert cfg["INPUT.MIN_SIZE_TRAIN"] == (480, 800) and cfg["INPUT.MIN_SIZE_TRAIN_SAMPLING"] == "range"
    assert cfg["INPUT.MIN_SIZE_TEST"] == 800 and cfg["INPUT.MAX_SIZE_TEST"] == 1333
    assert cfg["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"] == 512 and cfg["MODEL.RPN.POST_NMS_TOPK_TEST"] == 1000
    assert cfg["INPUT.FORMAT"] == "RGB" and cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False  # torchvision/MoCo weights
    assert cfg["MODEL.PIXEL_STD"] == [58.395, 57.120, 57.375] and cfg["MODEL.DEVICE"] == "cuda"
    assert cfg["MODEL.WEIGHTS"] == ""  # the backend loads the backbone itself, never from a URL


def test_tiny_profile_is_r18_fpn_with_the_torchvision_backends_widths():
    distill = profile("params.yaml").distill
    cfg = detectron2_config(distill, num_classes=4)
    assert cfg["MODEL.BACKBONE.NAME"] == "build_resnet_fpn_backbone" and cfg["MODEL.RESNETS.DEPTH"] == 18
    assert cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64 and cfg["MODEL.BACKBONE.FREEZE_AT"] == 0
    assert cfg["MODEL.FPN.OUT_CHANNELS"] == distill.fpn_channels
    assert cfg["MODEL.ANCHOR_GENERATOR.SIZES"] == [[s] for s in distill.anchor_sizes]  # one size per level
    assert cfg["MODEL.RPN.IN_FEATURES"] == ["p2", "p3", "p4", "p5", "p6"]
    assert cfg["MODEL.ROI_BOX_HEAD.FC_DIM"] == distill.representation_size and cfg["MODEL.ROI_BOX_HEAD.NUM_FC"] == 2
    assert cfg["MODEL.ROI_MASK_HEAD.NUM_CONV"] == len(distill.mask_head_channels)
    assert cfg["MODEL.ROI_MASK_HEAD.CONV_DIM"] == distill.mask_head_channels[0]
    assert cfg["MODEL.RPN.PRE_NMS_TOPK_TRAIN"] == cfg["MODEL.RPN.POST_NMS_TOPK_TRAIN"] == distill.train_proposals
    assert cfg["SOLVER.MAX_ITER"] == distill.steps and cfg["SOLVER.STEPS"] == tuple(distill.lr_steps)
    assert cfg["TEST.DETECTIONS_PER_IMAGE"] == distill.detections_per_image
    assert cfg["INPUT.MIN_SIZE_TRAIN"] == (distill.train_min_size, distill.train_max_size)


def test_values_are_plain_config_types():
    for name in ("params.yaml", "configs/paper.yaml", "configs/photos.yaml"):
        for key, value in detectron2_config(profile(name).distill, num_classes=3).items():
            assert re.fullmatch(r"[A-Z0-9_]+(\.[A-Z0-9_]+)*", key), key
            assert isinstance(value, (str, int, float, bool, list, tuple)), key


def test_params_detectron2_cannot_take_are_user_errors():
    tiny = parse_params({}).distill
    with pytest.raises(UserError, match="C4 box head"):
        detectron2_config(parse_params({"distill": {"fpn": False}}).distill, num_classes=3)
    with pytest.raises(UserError, match="one width"):
        detectron2_config(parse_params({"distill": {"mask_head_channels": [64, 32]}}).distill, num_classes=3)
    with pytest.raises(UserError, match="num_classes"):
        detectron2_config(tiny, num_classes=0)
    with pytest.raises(UserError, match="lr_steps"):
        detectron2_config(parse_params({"distill": {"steps": 100, "lr_steps": [80, 100]}}).distill, num_classes=3)


def moco_rule(name: str) -> str:
    """The renaming as MoCo's convert-pretrain-to-detectron2.py states it, step by step."""
    if "layer" not in name:
        name = "stem." + name
    for t in (1, 2, 3, 4):
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_every_trunk_tensor_gets_mocos_name_under_the_models_prefix(depth):
    state = create_resnet(depth).state_dict()
    kept = [k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    fpn = convert_resnet_state(state, fpn=True)
    assert set(fpn) == {"backbone.bottom_up." + moco_rule(k) for k in kept}
    c4 = convert_resnet_state(state, fpn=False)
    expected = {("roi_heads." if moco_rule(k).startswith("res5.") else "backbone.") + moco_rule(k) for k in kept}
    assert set(c4) == expected
    assert torch.equal(fpn["backbone.bottom_up.res3.1.conv2.weight"], state["layer2.1.conv2.weight"])
    assert torch.equal(c4["roi_heads.res5.0.shortcut.norm.running_var"], state["layer4.0.downsample.1.running_var"])


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed")
def test_missing_detectron2_is_one_line_naming_make_detectron2():
    with pytest.raises(UserError) as err:
        require_detectron2()
    assert "\n" not in str(err.value) and "`make detectron2`" in str(err.value)


def test_a_build_for_another_torch_is_one_line_naming_both_versions(tmp_path, monkeypatch):
    """A detectron2 whose compiled ops fail to load (what a wheel built against another torch does) is stopped
    with one line naming the torch it was built for (the install record) and the installed one."""
    package = tmp_path / "site" / "detectron2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_C.py").write_text("raise ImportError('_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv')\n")
    for name in [m for m in sys.modules if m == "detectron2" or m.startswith("detectron2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    record = tmp_path / "detectron2-build.json"
    record.write_text(json.dumps({"torch": "2.9.1"}))
    try:
        with pytest.raises(UserError) as err:
            require_detectron2(record)
        with pytest.raises(UserError, match="built for another torch"):
            require_detectron2(tmp_path / "no-record.json")
    finally:  # the fake package leaves; monkeypatch then puts back a real detectron2 that was imported before
        for name in [m for m in sys.modules if m == "detectron2" or m.startswith("detectron2.")]:
            del sys.modules[name]
    message = str(err.value)
    installed = torch.__version__.split("+")[0]
    assert "\n" not in message and "built for torch 2.9.1" in message and f"with torch {installed}" in message
    assert "`make detectron2`" in message and "undefined symbol" in message
