"""unseg.distill.detectron2_backend: the pure config translation, the weight renaming and the clear error.

detectron2 is never faked: only the pure parts are tested, plus the one-line error when it is absent.
"""

from __future__ import annotations

import importlib.util
import pickle
import re

import numpy as np
import pytest
import torch

from unseg.distill.detectron2_backend import (
    MISSING_DETECTRON2,
    convert_backbone_weights,
    detectron2_config,
    resnet_to_detectron2_names,
    train_and_predict_detectron2,
)
from unseg.errors import UserError
from unseg.models.resnet import create_resnet


def test_paper_schedule_and_r50_c4():
    cfg = detectron2_config({"num_classes": 20, "backbone_weights": "/w/moco.pth"})
    assert cfg["SOLVER.BASE_LR"] == 0.02
    assert cfg["SOLVER.STEPS"] == (20000, 22000) and cfg["SOLVER.MAX_ITER"] == 24000
    assert cfg["SOLVER.WARMUP_ITERS"] == 100 and cfg["SOLVER.GAMMA"] == 0.1
    assert cfg["SOLVER.IMS_PER_BATCH"] == 16
    assert cfg["MODEL.BACKBONE.FREEZE_AT"] == 2
    assert cfg["MODEL.BACKBONE.NAME"] == "build_resnet_backbone" and cfg["MODEL.RESNETS.DEPTH"] == 50
    assert cfg["MODEL.ROI_HEADS.NAME"].startswith("Res5ROIHeads")  # C4: res5 is the box/mask head
    assert cfg["MODEL.RESNETS.OUT_FEATURES"] == ["res4"] and cfg["MODEL.ROI_HEADS.IN_FEATURES"] == ["res4"]
    assert cfg["MODEL.MASK_ON"] is True and cfg["MODEL.ROI_HEADS.NUM_CLASSES"] == 20
    assert cfg["INPUT.MIN_SIZE_TRAIN"] == (480, 800) and cfg["INPUT.MIN_SIZE_TRAIN_SAMPLING"] == "range"
    assert cfg["INPUT.MIN_SIZE_TEST"] == 800
    assert cfg["MODEL.WEIGHTS"] == "/w/moco.pth"
    # MoCo's detection setup for torchvision-style weights
    assert cfg["INPUT.FORMAT"] == "RGB" and cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert cfg["MODEL.PIXEL_STD"] == [58.395, 57.120, 57.375]


def test_choice_sampling_like_moco_voc():
    sizes = tuple(range(480, 801, 32))
    cfg = detectron2_config({"num_classes": 3, "min_size_train": sizes, "min_size_train_sampling": "choice"})
    assert cfg["INPUT.MIN_SIZE_TRAIN"] == sizes and cfg["INPUT.MIN_SIZE_TRAIN_SAMPLING"] == "choice"
    assert min(sizes) == 480 and max(sizes) == 800


def test_linear_scaling_rule_for_fewer_gpus():
    cfg = detectron2_config({"num_classes": 3, "ims_per_batch": 8, "linear_scaling": True})
    assert cfg["SOLVER.BASE_LR"] == pytest.approx(0.01)
    assert cfg["SOLVER.MAX_ITER"] == 48000 and cfg["SOLVER.STEPS"] == (40000, 44000)
    assert cfg["SOLVER.WARMUP_ITERS"] == 200 and cfg["SOLVER.IMS_PER_BATCH"] == 8
    unscaled = detectron2_config({"num_classes": 3, "ims_per_batch": 8})
    assert unscaled["SOLVER.BASE_LR"] == 0.02 and unscaled["SOLVER.MAX_ITER"] == 24000


def test_values_are_plain_config_types():
    cfg = detectron2_config({"num_classes": 3})
    for key, value in cfg.items():
        assert re.fullmatch(r"[A-Z0-9_]+(\.[A-Z0-9_]+)*", key), key
        assert isinstance(value, (str, int, float, bool, list, tuple)), key


def test_bad_params_are_user_errors():
    with pytest.raises(UserError, match="unknown"):
        detectron2_config({"num_classes": 3, "learning_rate": 0.1})
    with pytest.raises(UserError, match="num_classes"):
        detectron2_config({})
    with pytest.raises(UserError, match="steps"):
        detectron2_config({"num_classes": 3, "steps": (30000,), "max_iter": 24000})
    with pytest.raises(UserError, match="range"):
        detectron2_config({"num_classes": 3, "min_size_train": (480, 640, 800)})


def moco_rule(name: str) -> str:
    """The renaming as MoCo's convert-pretrain-to-detectron2.py states it, step by step."""
    if "layer" not in name:
        name = "stem." + name
    for t in (1, 2, 3, 4):
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def test_weight_renaming():
    state = create_resnet("resnet50").state_dict()
    out = resnet_to_detectron2_names(state)
    assert out["stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert "stem.conv1.norm.running_var" in out and "res5.2.conv3.norm.bias" in out
    assert "res5.0.shortcut.weight" in out and "res5.0.shortcut.norm.running_mean" in out
    assert not any(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in out)
    expected = {moco_rule(k) for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(out) == expected
    assert np.array_equal(out["res3.1.conv2.weight"], state["layer2.1.conv2.weight"].numpy())


def test_convert_moco_checkpoint_to_pkl(tmp_path):
    src = create_resnet("resnet50")
    state = {"module.encoder_q." + k: v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "moco.pth.tar")
    path = convert_backbone_weights(tmp_path / "moco.pth.tar", tmp_path / "d2.pkl")
    with open(path, "rb") as f:
        obj = pickle.load(f)
    assert obj["matching_heuristics"] is True
    assert np.array_equal(obj["model"]["res4.0.conv1.weight"], src.layer3[0].conv1.weight.detach().numpy())


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed")
def test_missing_detectron2_is_one_line_user_error(tmp_path):
    cfg = detectron2_config({"num_classes": 3})
    with pytest.raises(UserError) as err:
        train_and_predict_detectron2(cfg, tmp_path / "train.json", tmp_path, tmp_path / "out", [])
    assert str(err.value) == MISSING_DETECTRON2 and "\n" not in str(err.value)
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in str(err.value)
