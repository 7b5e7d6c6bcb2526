"""The paper's Mask R-CNN setup on detectron2 (MaskDistill App. A.1), behind ``distill.backend=detectron2``.

MaskDistill never published its detectron2 configs (reference.md §1.1 "Mask R-CNN", §1.4 item 10).
The paper says it follows MoCo's detection protocol [He et al. 2020]: R50-C4 Mask R-CNN, MoCo
initialisation, first two stages frozen, shorter side drawn from [480, 800] in training and 800 at
test, LR 0.02 decayed x0.1 at 20k and 22k iterations, 24k iterations, 100 warm-up iterations.
:func:`detectron2_config` writes that as a complete, flat detectron2 config; the rest (R50-C4 with
an extra BatchNorm after res5, naive SyncBN, RGB input with ImageNet mean/std in 0..255, test-time RPN
6000/1000 proposals, precise BN) is taken from MoCo's ``detection/configs/Base-RCNN-C4-BN.yaml``
and ``*_moco.yaml``. detectron2 itself is imported only by :func:`train_and_predict_detectron2`.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from unseg.coco import annotation, read_json, write_json
from unseg.data.images import read_image
from unseg.errors import UserError
from unseg.models.checkpoint import read_checkpoint
from unseg.models.resnet import resnet_state_dict_from_checkpoint

MISSING_DETECTRON2 = (
    "distill.backend=detectron2 needs detectron2, which is not installed: pip install "
    "'git+https://github.com/facebookresearch/detectron2.git' (needs a C++ compiler and the torch it is built against)"
)

# Our params with the paper's values (App. A.1) and MoCo's where the paper is silent.
DETECTRON2_DEFAULTS: dict = {
    "num_classes": None,  # required: number of pseudo-label categories
    "depth": 50,  # R50-C4
    "roi_heads": "Res5ROIHeadsExtraNorm",  # MoCo's C4 head: Res5ROIHeads + a norm after res5
    "norm": "naiveSyncBN",  # MoCo's Base-RCNN-C4-BN.yaml (also runs on one GPU without a process group)
    "freeze_at": 2,  # stem + res2 frozen ("first two backbone stages"; MoCo itself used 0)
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "gamma": 0.1,
    "max_iter": 24000,
    "steps": (20000, 22000),
    "warmup_iters": 100,
    "ims_per_batch": 16,
    "reference_batch": 16,  # batch the schedule above was written for
    "linear_scaling": False,  # scale lr by batch/16 and iterations by 16/batch when the batch differs
    "min_size_train": (480, 800),
    "min_size_train_sampling": "range",  # paper: a random value in [480, 800]; MoCo's VOC config: 'choice'
    "max_size_train": 1333,
    "min_size_test": 800,
    "max_size_test": 1333,
    "backbone_weights": "",  # local checkpoint (torchvision/MoCo/HSG .pth, or a detectron2 .pkl); '' = scratch
    "score_thresh_test": 0.05,
    "detections_per_image": 100,
    "train_proposals": 2000,  # RPN POST_NMS_TOPK_TRAIN (C4 default)
    "test_proposals": 1000,  # RPN POST_NMS_TOPK_TEST
    "precise_bn": True,
    "amp": False,
    "num_workers": 4,
    "checkpoint_period": 5000,
    "seed": 0,
    "device": "cuda",
    "output_dir": "",
    "train_dataset": "unseg_pseudo_train",
    "test_dataset": "unseg_pseudo_predict",
}


def _scaled_schedule(p: dict) -> tuple[float, int, tuple[int, ...], int]:
    """(lr, max_iter, steps, warmup) after the linear scaling rule (Goyal et al.), if enabled."""
    lr, max_iter, steps, warmup = (
        float(p["lr"]),
        int(p["max_iter"]),
        tuple(int(s) for s in p["steps"]),
        int(p["warmup_iters"]),
    )
    if not p["linear_scaling"] or int(p["ims_per_batch"]) == int(p["reference_batch"]):
        return lr, max_iter, steps, warmup
    factor = int(p["ims_per_batch"]) / int(p["reference_batch"])
    return (
        lr * factor,
        int(round(max_iter / factor)),
        tuple(int(round(s / factor)) for s in steps),
        int(round(warmup / factor)),
    )


def detectron2_config(cfg: dict) -> dict:
    """Translate our ``distill`` params into a flat detectron2 config ``{'MODEL.X': value, ...}``.

    Pure (no detectron2 import). Unknown keys and a missing ``num_classes`` are ``UserError``s.
    Apply with ``cfg.merge_from_list([k, v, k, v, ...])`` on ``get_cfg()``.
    """
    unknown = sorted(set(cfg) - set(DETECTRON2_DEFAULTS))
    if unknown:
        raise UserError(f"detectron2 config: unknown keys {unknown}")
    p = {**DETECTRON2_DEFAULTS, **cfg}
    if not p["num_classes"] or int(p["num_classes"]) < 1:
        raise UserError("detectron2 config: num_classes must be a positive integer")
    if p["min_size_train_sampling"] not in ("range", "choice"):
        raise UserError(f"min_size_train_sampling must be 'range' or 'choice', got {p['min_size_train_sampling']!r}")
    if p["min_size_train_sampling"] == "range" and len(p["min_size_train"]) != 2:
        raise UserError(f"min_size_train_sampling 'range' needs [min, max], got {list(p['min_size_train'])}")
    lr, max_iter, steps, warmup = _scaled_schedule(p)
    if not all(0 < s < max_iter for s in steps) or list(steps) != sorted(steps):
        raise UserError(f"detectron2 config: steps {steps} must increase and lie inside max_iter {max_iter}")
    return {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.DEVICE": p["device"],
        "MODEL.WEIGHTS": str(p["backbone_weights"] or ""),
        "MODEL.MASK_ON": True,
        "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
        "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
        "MODEL.BACKBONE.NAME": "build_resnet_backbone",
        "MODEL.BACKBONE.FREEZE_AT": int(p["freeze_at"]),
        "MODEL.RESNETS.DEPTH": int(p["depth"]),
        "MODEL.RESNETS.NORM": p["norm"],
        "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision/MoCo ResNets stride in the 3x3 conv
        "MODEL.RESNETS.OUT_FEATURES": ["res4"],
        "MODEL.RESNETS.RES5_DILATION": 1,
        "MODEL.RPN.IN_FEATURES": ["res4"],
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": int(p["train_proposals"]),
        "MODEL.RPN.POST_NMS_TOPK_TEST": int(p["test_proposals"]),
        "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],
        "MODEL.ROI_HEADS.NAME": p["roi_heads"],
        "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
        "MODEL.ROI_HEADS.NUM_CLASSES": int(p["num_classes"]),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": float(p["score_thresh_test"]),
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
        "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
        "INPUT.FORMAT": "RGB",
        "INPUT.MIN_SIZE_TRAIN": tuple(int(s) for s in p["min_size_train"]),
        "INPUT.MIN_SIZE_TRAIN_SAMPLING": p["min_size_train_sampling"],
        "INPUT.MAX_SIZE_TRAIN": int(p["max_size_train"]),
        "INPUT.MIN_SIZE_TEST": int(p["min_size_test"]),
        "INPUT.MAX_SIZE_TEST": int(p["max_size_test"]),
        "INPUT.MASK_FORMAT": "bitmask",  # our pseudo-labels are RLE
        "DATASETS.TRAIN": (p["train_dataset"],),
        "DATASETS.TEST": (p["test_dataset"],),
        "DATALOADER.NUM_WORKERS": int(p["num_workers"]),
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
        "SOLVER.IMS_PER_BATCH": int(p["ims_per_batch"]),
        "SOLVER.BASE_LR": lr,
        "SOLVER.MOMENTUM": float(p["momentum"]),
        "SOLVER.WEIGHT_DECAY": float(p["weight_decay"]),
        "SOLVER.GAMMA": float(p["gamma"]),
        "SOLVER.STEPS": steps,
        "SOLVER.MAX_ITER": max_iter,
        "SOLVER.WARMUP_ITERS": warmup,
        "SOLVER.WARMUP_METHOD": "linear",
        "SOLVER.CHECKPOINT_PERIOD": int(p["checkpoint_period"]),
        "SOLVER.AMP.ENABLED": bool(p["amp"]),
        "TEST.DETECTIONS_PER_IMAGE": int(p["detections_per_image"]),
        "TEST.PRECISE_BN.ENABLED": bool(p["precise_bn"]),
        "TEST.EVAL_PERIOD": 0,
        "SEED": int(p["seed"]),
        "OUTPUT_DIR": str(p["output_dir"]),
    }


def resnet_to_detectron2_names(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """torchvision ResNet names -> detectron2 ``build_resnet_backbone`` names, as numpy arrays.

    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layerK`` -> ``res{K+1}``; ``bnJ`` ->
    ``convJ.norm``; ``downsample.0``/``.1`` -> ``shortcut``/``shortcut.norm`` (the renaming MoCo's
    ``convert-pretrain-to-detectron2.py`` performs). ``fc.*`` and ``num_batches_tracked`` are dropped.
    """
    out = {}
    for name, value in state.items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        new = name if name.startswith("layer") else "stem." + name
        for k in (1, 2, 3, 4):
            new = new.replace(f"layer{k}.", f"res{k + 1}.")
        for j in (1, 2, 3):
            new = new.replace(f"bn{j}.", f"conv{j}.norm.")
        new = new.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
        out[new] = value.detach().cpu().numpy()
    return out


def convert_backbone_weights(path: str | Path, out_path: str | Path) -> Path:
    """Write a detectron2 ``.pkl`` (``{'model': ..., 'matching_heuristics': True}``) from a torch ResNet checkpoint."""
    obj = read_checkpoint(path, "backbone weights")
    state, _, _ = resnet_state_dict_from_checkpoint(obj, str(path))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:
        pickle.dump({"model": resnet_to_detectron2_names(state), "__author__": "unseg", "matching_heuristics": True}, f)
    return out_path


def _import_detectron2():
    try:
        import detectron2  # noqa: F401
    except ImportError as err:
        raise UserError(MISSING_DETECTRON2) from err


def _register_extra_norm_head() -> None:
    """Register MoCo's ``Res5ROIHeadsExtraNorm`` (Res5ROIHeads + a norm layer after res5) once."""
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        def __init__(self, cfg, input_shape):
            super().__init__(cfg, input_shape)
            self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels))


def _json_with_absolute_files(train_json: str | Path, image_root_or_mapping, out_dir: Path) -> tuple[Path, str]:
    """A copy of the pseudo-label json whose ``file_name`` are absolute paths, when given a mapping."""
    if not isinstance(image_root_or_mapping, Mapping):
        return Path(train_json), str(image_root_or_mapping)
    coco = read_json(train_json)
    for image in coco["images"]:
        path = image_root_or_mapping.get(int(image["id"]))
        if path is None:
            raise UserError(f"no image file given for image id {image['id']}")
        image["file_name"] = str(Path(path).resolve())
    out = out_dir / "train_absolute_paths.json"
    write_json(coco, out)
    return out, ""


def train_and_predict_detectron2(
    config_dict: dict,
    train_json: str | Path,
    image_root_or_mapping: str | Path | Mapping[int, str | Path],
    out_dir: str | Path,
    predict_images: Iterable[tuple[int, str | Path]],
) -> list[dict]:
    """Train detectron2 on the pseudo-labels, predict ``(image_id, path)`` images, return COCO results.

    ``config_dict`` comes from :func:`detectron2_config`. The pseudo-labels are registered with
    ``register_coco_instances`` under ``DATASETS.TRAIN[0]``; a torch backbone checkpoint is converted to
    a detectron2 ``.pkl`` first. Results have the format of
    :func:`unseg.distill.maskrcnn.predict_instances` and are also written to ``out_dir/predictions.json``.
    Category ids are the json's own (detectron2's contiguous ids mapped back); masks are detectron2's
    (probability > 0.5, pasted at the original resolution). Resumes from the last detectron2
    checkpoint in ``OUTPUT_DIR`` (``out_dir`` when empty).
    """
    _import_detectron2()
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import DefaultPredictor, DefaultTrainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(config_dict)
    config["OUTPUT_DIR"] = config.get("OUTPUT_DIR") or str(out_dir)
    weights = config.get("MODEL.WEIGHTS", "")
    if weights and not str(weights).endswith(".pkl"):
        config["MODEL.WEIGHTS"] = str(convert_backbone_weights(weights, out_dir / "backbone_detectron2.pkl"))
    _register_extra_norm_head()
    json_path, image_root = _json_with_absolute_files(train_json, image_root_or_mapping, out_dir)
    name = config["DATASETS.TRAIN"][0]
    if name not in MetadataCatalog.list():
        register_coco_instances(name, {}, str(json_path), image_root)
    cfg = get_cfg()
    cfg.merge_from_list([x for kv in config.items() for x in kv])
    cfg.DATASETS.TEST = ()  # prediction happens below, not in the trainer's evaluation hook
    cfg.freeze()

    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()

    predictor_cfg = cfg.clone()
    predictor_cfg.defrost()
    predictor_cfg.MODEL.WEIGHTS = str(Path(cfg.OUTPUT_DIR) / "model_final.pth")
    predictor = DefaultPredictor(predictor_cfg)
    contiguous_to_id = {v: k for k, v in MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id.items()}
    results = []
    for image_id, path in predict_images:
        image_bgr = np.ascontiguousarray(read_image(path)[:, :, ::-1])  # the pipeline's reader, as BGR
        instances = predictor(image_bgr)["instances"].to("cpu")
        masks = instances.pred_masks.numpy()
        for mask, cls, score in zip(masks, instances.pred_classes.tolist(), instances.scores.tolist(), strict=True):
            if not mask.any():
                continue
            category = contiguous_to_id[int(cls)]
            results.append(annotation(len(results) + 1, int(image_id), category, mask, score=float(score)))
    write_json(results, out_dir / "predictions.json")
    return results


def run_detectron2(
    cfg: dict, train_json: dict, paths: dict[int, str], index, work: Path, out: Path, log_path: Path
) -> None:
    """The detectron2 branch of ``distill_maskrcnn``: train on ``train_json`` in ``work`` (resumable), predict
    every image of ``index``; writes ``out/predictions.json``, ``out/model.pt`` and the loss log."""
    write_json(train_json, work / "train.json")
    preds = train_and_predict_detectron2(
        detectron2_config(cfg), work / "train.json", paths, work, [(e.id, e.file) for e in index.images]
    )
    write_json(preds, out / "predictions.json")
    shutil.copy(work / "model_final.pth", out / "model.pt")
    metrics = work / "metrics.json"  # detectron2's per-iteration log (json lines)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(
        "step,loss\n" + "".join(f"{r['iteration']},{r['total_loss']}\n" for r in rows if "total_loss" in r)
    )
