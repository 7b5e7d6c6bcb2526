"""Mask R-CNN distillation on detectron2, the paper's backend (MaskDistill Sec. 3.2, App. A.1).

Import only after :func:`unseg.distill.detectron2_config.require_detectron2`. detectron2's own parts do the
work: the pseudo-labels are a registered COCO dataset (``register_coco_instances``), the model is
``build_model`` of the config that :func:`~unseg.distill.detectron2_config.detectron2_config` writes, the
loop is ``SimpleTrainer`` (``AMPTrainer`` in bf16 on CUDA) with the ``LRScheduler`` and
``PeriodicCheckpointer`` hooks and a ``DetectionCheckpointer``. What the project adds keeps training exact
under interruption, as on the torchvision backend: the batch of step s (images, sizes, flips) and the
model's random draws inside it depend only on (seed, s) (:class:`StepSeeds`, the harness's ``StepBatches``),
and checkpoints are written by rename, so a run killed at any moment resumes to the weights of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unseg import coco
from unseg.data.images import read_image
from unseg.distill.detectron2_config import C4_EXTRA_NORM_HEAD, convert_resnet_state, detectron2_config
from unseg.errors import UserError
from unseg.models.checkpoint import read_checkpoint
from unseg.models.resnet import resnet_state_dict_from_checkpoint
from unseg.progress import progress
from unseg.train import harness as H

with warnings.catch_warnings():  # detectron2 0.6 on torch 2.x: torch.jit.script deprecation notices at import
    warnings.simplefilter("ignore")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import CfgNode, get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils, get_detection_dataset_dicts
    from detectron2.data import transforms as T
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer, hooks
    from detectron2.layers import get_norm
    from detectron2.modeling import build_model
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
    from detectron2.solver import build_lr_scheduler, build_optimizer

# notices from detectron2 0.6's calls into torch 2.x, one per process, that say nothing about the run
warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release", category=UserWarning)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # is_fx_tracing's deprecation line
for _name in ("detectron2", "fvcore"):  # their info lines and logged tracebacks: the stage prints its own one line
    logging.getLogger(_name).addHandler(logging.NullHandler())
    logging.getLogger(_name).propagate = False

DATASET = "unseg_pseudo_labels"

if C4_EXTRA_NORM_HEAD not in ROI_HEADS_REGISTRY:

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """MoCo's C4 box head (detection/train_net.py): ``Res5ROIHeads`` with a norm layer after res5."""

        def __init__(self, cfg, input_shape):
            super().__init__(cfg, input_shape)
            self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels))


def build_cfg(flat: dict) -> CfgNode:
    """detectron2's default config with the flat ``{'MODEL.X': value}`` of ``detectron2_config`` merged in."""
    cfg = get_cfg()
    cfg.merge_from_list([x for item in flat.items() for x in item])
    cfg.freeze()
    return cfg


# ---------------------------------------------------------------- data


def register_pseudo_labels(instances: dict, image_paths: dict[int, Path]) -> list[dict]:
    """Register the pseudo-label COCO json as detectron2's dataset ``DATASET`` and return its records, images
    without instances left out (``get_detection_dataset_dicts``). ``file_name`` becomes each image's path. The
    json lives in a temporary folder of this process (DDP ranks do not share it) while the records load."""
    missing = [im["id"] for im in instances["images"] if int(im["id"]) not in image_paths]
    if missing:
        raise UserError(f"no image file given for image ids {missing[:5]}")
    images = [{**im, "file_name": str(Path(image_paths[int(im["id"])]).resolve())} for im in instances["images"]]
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # pycocotools' prints
        json_path = Path(tmp) / "pseudo_labels.json"
        coco.write_json({**instances, "images": images}, json_path)
        register_coco_instances(DATASET, {}, str(json_path), "")
        return get_detection_dataset_dicts([DATASET], filter_empty=True)


def category_ids() -> list[int]:
    """The pseudo-label category id of each of detectron2's contiguous classes 0..K-1."""
    to_contiguous = MetadataCatalog.get(DATASET).thing_dataset_id_to_contiguous_id
    return [cid for cid, _ in sorted(to_contiguous.items(), key=lambda item: item[1])]


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global generator seeded for the block (detectron2's augmentations draw from it), then restored."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


class TrainingMapper:
    """A record -> detectron2's training input: the pipeline's image reader, then detectron2's
    ``ResizeShortestEdge`` (shorter side drawn from ``INPUT.MIN_SIZE_TRAIN``) and ``RandomFlip(flip_p)``,
    with their draws seeded per item; masks stay bitmasks, instances emptied by the resize are dropped."""

    def __init__(self, cfg: CfgNode, flip_p: float):
        self.augmentations = T.AugmentationList(
            [
                T.ResizeShortestEdge(
                    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
                ),
                *([T.RandomFlip(prob=flip_p)] if flip_p > 0 else []),
            ]
        )

    def __call__(self, record: dict, seed: int) -> dict:
        image = read_image(record["file_name"])
        detection_utils.check_image_size(record, image)
        aug = T.AugInput(image)
        with numpy_seeded(seed):
            transforms = self.augmentations(aug)
        shape = aug.image.shape[:2]
        annotations = [
            detection_utils.transform_instance_annotations(dict(a), transforms, shape)  # it writes into the dict
            for a in record["annotations"]
            if not a.get("iscrowd", 0)
        ]
        instances = detection_utils.annotations_to_instances(annotations, shape, mask_format="bitmask")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(aug.image.transpose(2, 0, 1))),
            "height": record["height"],
            "width": record["width"],
            "instances": detection_utils.filter_empty_instances(instances),
        }


def step_batches(records: Sequence[dict], mapper: TrainingMapper, batch_size: int, seed: int, info) -> H.StepBatches:
    """Global batch s: the harness's permutation slice of ``records``, item i mapped with seed (seed, s, 1000 + i)."""
    return H.StepBatches(
        len(records),
        batch_size,
        seed,
        lambda idx, step: [mapper(records[i], H.step_seed(seed, step, 1000 + i)) for i in idx],
        info,
    )


# ---------------------------------------------------------------- model and weights


def load_backbone(model: torch.nn.Module, path: str | Path, *, fpn: bool) -> str:
    """Initialise the ResNet trunk of ``model`` from a torchvision-format checkpoint (HSG's, MoCo's, a plain
    state dict): every tensor is renamed to detectron2's names and must exist in the model with its shape.
    Returns the one-line report (loaded count, and the trunk tensors the checkpoint did not cover)."""
    state, _, _ = resnet_state_dict_from_checkpoint(read_checkpoint(path, "backbone weights"), str(path))
    converted = convert_resnet_state(state, fpn=fpn)
    own = model.state_dict()
    unmatched = [k for k in converted if k not in own]
    if unmatched:
        raise UserError(f"{path}: {len(unmatched)} tensors have no place in the detectron2 model, e.g. {unmatched[:3]}")
    wrong = [k for k, v in converted.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise UserError(
            f"{path}: {wrong[0]} has shape {tuple(converted[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)} "
            "(another ResNet depth than distill.backbone?)"
        )
    trunk = ("backbone.bottom_up.",) if fpn else ("backbone.stem.", "backbone.res", "roi_heads.res5.")
    head = "roi_heads.res5.norm."  # MoCo's extra norm after res5 belongs to the box head: it starts untrained
    uncovered = [
        k
        for k in own
        if k.startswith(trunk)
        and not k.startswith(head)
        and k not in converted
        and not k.endswith("num_batches_tracked")
    ]
    model.load_state_dict(converted, strict=False)
    return f"{path}: {len(converted)} tensors loaded into the trunk; not in the checkpoint: {uncovered or 'none'}"


# ---------------------------------------------------------------- training


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files appear whole or not at all (temporary file, then rename)."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()}}
        data.update(kwargs)
        path = Path(self.save_dir) / f"{name}.pth"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(data, tmp)
        os.replace(tmp, path)
        self.tag_last_checkpoint(path.name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = Path(self.save_dir) / "last_checkpoint"
        tmp = tag.with_name(tag.name + ".tmp")
        tmp.write_text(last_filename_basename)
        os.replace(tmp, tag)


class StepSeeds(HookBase):
    """Seed torch's global generator from (seed, step) before each step (the RPN's and RoI heads' sampling),
    as the harness does for every other training loop."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def before_step(self):
        torch.manual_seed(H.step_seed(self.seed, self.trainer.iter, salt=2) + self.rank)


class ClipGradients(HookBase):
    """Clip the gradient norm of the whole model (as the torchvision backend does; detectron2's own clipping is
    per parameter) between backward and the optimizer step."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def after_backward(self):
        params = [p for g in self.trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


class LossLog(HookBase):
    """Each step's losses to the project's CSV loss log (rows after a resumed step dropped) and a progress bar."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = path, is_main

    def before_train(self):
        start, total = self.trainer.start_iter, self.trainer.max_iter
        self.log = H.CsvLog(self.path, resume_step=start, is_main=self.is_main)
        self.bar = progress(total=total, initial=start, desc="maskrcnn", disable=not self.is_main, dynamic_ncols=True)

    def after_step(self):
        latest = self.trainer.storage.latest()
        values = {k: v for k, (v, _) in latest.items() if k == "total_loss" or k.startswith("loss_") or k == "lr"}
        if "total_loss" in values:
            values = {"loss": values.pop("total_loss"), **values}
            self.log.write(self.trainer.iter, values)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(values.items())[:3]}, refresh=False)
        self.bar.update(1)

    def after_train(self):
        self.bar.close()


def train_detectron2(
    cfg: CfgNode,
    records: Sequence[dict],
    *,
    ckpt_dir: Path,
    log_path: Path,
    seed: int,
    flip_p: float,
    clip_grad: float,
    amp: bool,
    workers: int,
    backbone_weights: str | None = None,
    info: H.DistInfo = H.SINGLE_PROCESS,
    extra_hooks: Sequence[HookBase] = (),
) -> tuple[torch.nn.Module, int, str]:
    """Train detectron2's Mask R-CNN of ``cfg`` on ``records`` for ``SOLVER.MAX_ITER`` steps, resuming from the
    last checkpoint in ``ckpt_dir``; returns the trained model, the number of steps run now and the backbone
    initialisation's report. ``extra_hooks`` run after the project's (a benchmark's clock)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    report = "from scratch"
    if backbone_weights:
        report = load_backbone(model, backbone_weights, fpn=cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone")
    device = torch.device(cfg.MODEL.DEVICE)
    trained = H.wrap_ddp(model, info, device, broadcast_buffers=False)
    optimizer = build_optimizer(cfg, model)
    if amp and device.type == "cuda":  # bf16 needs no loss scaling: the scaler is off
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        trainer = AMPTrainer(trained, [], optimizer, grad_scaler=scaler, precision=torch.bfloat16)
    else:
        trainer = SimpleTrainer(trained, [], optimizer)
    checkpointer = AtomicCheckpointer(model, str(ckpt_dir), save_to_disk=info.is_main, trainer=trainer)
    trainer.register_hooks(
        [
            StepSeeds(seed, info.rank),
            ClipGradients(clip_grad) if clip_grad > 0 else None,
            hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer)),
            LossLog(log_path, info.is_main),
            hooks.PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=2),
            *extra_hooks,
        ]
    )
    checkpointer.resume_or_load("", resume=True)  # the last checkpoint, with the trainer's iteration and optimizer
    start = trainer.iter + 1 if checkpointer.has_checkpoint() else 0  # past the end after model_final: no steps
    total = cfg.SOLVER.MAX_ITER
    batches = step_batches(records, TrainingMapper(cfg, flip_p), cfg.SOLVER.IMS_PER_BATCH, seed, info)
    trainer.data_loader = H.step_loader(batches, start, total, workers)
    try:
        trainer.train(start, total)
    except FloatingPointError as err:
        raise UserError(
            f"maskrcnn: the loss became non-finite at step {trainer.iter}; lower distill.lr or set distill.clip_grad"
        ) from err
    return model, max(0, total - start), report


# ---------------------------------------------------------------- prediction


@torch.no_grad()
def predict_detectron2(
    model: torch.nn.Module,
    cfg: CfgNode,
    images: Iterable[tuple[int, str | Path | np.ndarray]],
    *,
    category_ids: Sequence[int],
    batch_size: int = 1,
    amp: bool = False,
) -> list[dict]:
    """COCO results for ``(image_id, path or (H, W, 3) uint8 image)`` pairs, written by the torchvision backend's
    writer (:func:`unseg.coco.instance_results`): masks pasted at the original resolution (probability > 0.5), scores
    at least ``ROI_HEADS.SCORE_THRESH_TEST``, ``category_id`` the pseudo-label category."""
    model.eval()
    device = torch.device(cfg.MODEL.DEVICE)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    results: list[dict] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        inputs = [
            {
                "image": torch.from_numpy(
                    np.ascontiguousarray(resize.get_transform(im).apply_image(im).transpose(2, 0, 1))
                ),
                "height": im.shape[0],
                "width": im.shape[1],
            }
            for _, im in pending
        ]
        with H.autocast(device, amp):
            outputs = model(inputs)
        for (image_id, _), out in zip(pending, outputs, strict=True):
            inst = out["instances"].to("cpu")
            categories = [category_ids[c] for c in inst.pred_classes.tolist()]
            results.extend(
                coco.instance_results(image_id, inst.pred_masks.numpy(), categories, inst.scores.float().tolist())
            )
        pending.clear()

    for image_id, image in images:
        pending.append((int(image_id), image if isinstance(image, np.ndarray) else read_image(image)))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return coco.number_results(results)


# ---------------------------------------------------------------- the stage's entry point


@dataclass
class Distilled:
    model: torch.nn.Module  # trained, in eval mode
    config: dict  # the flat detectron2 config that rebuilds it
    category_ids: list[int]  # the pseudo-label category of each class
    predictions: list[dict]
    steps_run: int
    init_report: str


def distill_with_detectron2(
    distill,
    *,
    instances: dict,
    image_paths: dict[int, Path],
    predict: Iterable[tuple[int, str | Path]],
    backbone_weights: str | None,
    ckpt_dir: Path,
    log_path: Path,
    device: torch.device,
    info: H.DistInfo = H.SINGLE_PROCESS,
) -> Distilled | None:
    """Train on the pseudo-label ``instances`` (resumable in ``ckpt_dir``), then predict the ``predict`` images.
    Returns ``None`` on every process but the main one."""
    flat = detectron2_config(distill, num_classes=len(instances["categories"]), device=device.type)
    cfg = build_cfg(flat)
    records = register_pseudo_labels(instances, image_paths)
    model, ran, report = train_detectron2(
        cfg,
        records,
        ckpt_dir=ckpt_dir,
        log_path=log_path,
        seed=distill.seed,
        flip_p=distill.flip_p,
        clip_grad=distill.clip_grad,
        amp=distill.amp,
        workers=distill.workers,
        backbone_weights=backbone_weights,
        info=info,
    )
    if not info.is_main:
        return None
    ids = category_ids()
    preds = predict_detectron2(model, cfg, predict, category_ids=ids, batch_size=distill.batch_size, amp=distill.amp)
    return Distilled(model, flat, ids, preds, ran, report)
