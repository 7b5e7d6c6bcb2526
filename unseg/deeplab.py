"""DeepLab-v3 on a dilated ResNet, trained with hard pixel mining (MaskDistill Sec. 3.3, Eq. 4).

The model is the released one (reference.md §1.1 "DeepLab-v3 training", built from torchvision
parts): a ResNet dilated to output stride 8, torchvision's ``DeepLabHead`` (ASPP with rates
(12, 24, 36) and image pooling, 256 channels, dropout 0.5, then 3x3 conv-BN-ReLU and a 1x1
classifier), logits upsampled bilinearly to the input size. The first blocks are frozen:
no gradient and BatchNorm statistics kept (:func:`set_train_mode`). An optional low-level decoder
(:class:`LowLevelDecoder`, DeepLab-v3+) is a named extension, off in the paper profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from unseg.data.index import read_image
from unseg.errors import UserError
from unseg.matching import ConfusionAccumulator, evaluate_clusters
from unseg.models.bundle import load_state
from unseg.models.checkpoint import read_checkpoint, save_checkpoint
from unseg.models.resnet import create_resnet, load_resnet_weights, resnet_stage_channels
from unseg.models.vit import IMAGENET_MEAN, IMAGENET_STD
from unseg.progress import progress
from unseg.train.harness import autocast, uniform, unwrap

_DILATION_FOR_STRIDE = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
_STAGES = ("layer1", "layer2", "layer3", "layer4")


class AtrousConv2d(nn.Conv2d):
    """A same-padded, stride-1 atrous convolution that leaves out the kernel rows (columns) whose taps
    all fall in the zero padding: with dilation d >= H, output row i reads rows i ± d, none inside
    [0, H). The result is the same; DeepLab-v3 (Chen et al. 2017, Sec. 3.3) notes that on a small
    feature map a large rate "degenerates to a simple 1x1 filter" (at tiny's 8x8 map, all ASPP rates)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (dh, dw), (ph, pw) = self.kernel_size, self.dilation, self.padding
        drop_rows, drop_cols = dh >= x.shape[-2], dw >= x.shape[-1]
        if not (drop_rows or drop_cols):
            return super().forward(x)
        rows = slice(kh // 2, kh // 2 + 1) if drop_rows else slice(None)
        cols = slice(kw // 2, kw // 2 + 1) if drop_cols else slice(None)
        padding = (0 if drop_rows else ph, 0 if drop_cols else pw)
        return F.conv2d(x, self.weight[:, :, rows, cols], self.bias, 1, padding, self.dilation, self.groups)


def atrous_conv(conv: nn.Conv2d) -> AtrousConv2d:
    """``conv`` (3x3 or any odd kernel, stride 1, padding = dilation) as an :class:`AtrousConv2d`, same parameters."""
    if conv.stride != (1, 1) or conv.padding != conv.dilation or any(k % 2 == 0 for k in conv.kernel_size):
        raise ValueError("atrous_conv needs a stride-1 conv with an odd kernel and padding equal to its dilation")
    out = AtrousConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
    )  # fmt: skip
    out.load_state_dict(conv.state_dict())
    return out


class LowLevelDecoder(nn.Module):
    """DeepLab-v3+'s decoder (Chen et al., ECCV 2018, Sec. 3.1): sharper boundaries from stride-4 features.

    ``forward(high, low)``: the ASPP branch ``high`` (B, C_h, h, w) upsampled bilinearly to the size of
    ``low`` (B, C_l, 4h', 4w'), the layer1 features, which a 1x1 conv projects to ``low_proj`` channels
    (48 in the paper, so they do not outweigh the semantic ones); the concatenation goes through one
    3x3 conv-BN-ReLU to ``out_channels`` (B, out_channels, H/4, W/4). The paper uses two 3x3 convs of
    256 channels; one of 64 adds about 31 % to a tiny model's step (0.67 -> 0.87 s, 1 CPU thread, batch 8).
    """

    def __init__(self, low_channels: int, high_channels: int = 256, low_proj: int = 48, out_channels: int = 64):
        super().__init__()
        self.project = nn.Sequential(
            nn.Conv2d(low_channels, low_proj, 1, bias=False), nn.BatchNorm2d(low_proj), nn.ReLU(inplace=True)
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(high_channels + low_proj, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, self.project(low)], dim=1))


class DeepLabV3(nn.Module):
    """DeepLab-v3: ``head(backbone(normalise(x)))`` upsampled to the input size.

    Input: (B, 3, H, W) float in [0, 1] (ImageNet normalisation happens inside). Output: (B, C, H, W)
    logits. ``head[4]`` is the final 1x1 classifier, the layer that MaskDistill's "linear" protocol
    re-trains (reference.md §1.1 "Evaluation"); :meth:`classifier_input` is what it sees. With a
    ``decoder`` the classifier sees the decoder's stride-4 output instead of ``head[:4]``'s.
    ``frozen`` names the backbone modules kept frozen.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        frozen: Sequence[str] = (),
        decoder: LowLevelDecoder | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.decoder = decoder
        self.frozen = tuple(frozen)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> (the backbone's last stage (B, C, h, w), :meth:`classifier_input`)."""
        features = self.backbone((x - self.mean) / self.std)
        out = features["out"]
        for layer in list(self.head)[:4]:
            out = layer(out)
        return features["out"], (out if self.decoder is None else self.decoder(out, features["low"]))

    def classifier_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the features (B, D, h, w) that the final 1x1 classifier ``head[4]`` maps."""
        return self.features(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head[4](self.classifier_input(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def frozen_stage_names(freeze_blocks: int) -> tuple[str, ...]:
    """Backbone modules frozen by ``freeze_blocks`` = k: the stem (conv1, bn1) and layer1..layer k.

    k = 2 is the paper's "freeze the first two ResNet blocks" and the released ``freeze_layers: 2``
    (conv1, bn1, layer1, layer2); k = 0 freezes nothing.
    """
    if not 0 <= freeze_blocks <= 4:
        raise UserError(f"freeze_blocks must be in 0..4, got {freeze_blocks}")
    if freeze_blocks == 0:
        return ()
    return ("conv1", "bn1", *_STAGES[:freeze_blocks])


def build_deeplab(
    num_classes: int,
    backbone: str = "resnet50",
    output_stride: int = 8,
    aspp_rates: Sequence[int] = (12, 24, 36),
    freeze_blocks: int = 2,
    backbone_weights: str | None = None,
    dropout: float = 0.5,
    decoder_channels: int | None = None,
) -> DeepLabV3:
    """DeepLab-v3 with ``num_classes`` outputs (background included) on a dilated ResNet.

    ``output_stride`` 8 dilates layer3 (2) and layer4 (4); 16 dilates layer4 only. ``backbone_weights``
    is a local checkpoint read by :func:`unseg.models.resnet.load_resnet_weights` (MoCo, HSG or
    torchvision format). ``dropout`` is the ASPP projection's dropout (torchvision and released: 0.5).
    ``decoder_channels`` adds a :class:`LowLevelDecoder` of that width on layer1 (null: DeepLab-v3 as released).
    """
    if output_stride not in _DILATION_FOR_STRIDE:
        raise UserError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    if num_classes < 2:
        raise UserError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    resnet = create_resnet(backbone, _DILATION_FOR_STRIDE[output_stride])
    if backbone_weights:
        load_resnet_weights(resnet, backbone_weights)
    channels = resnet_stage_channels(resnet)
    layers = {"layer4": "out"} if decoder_channels is None else {"layer1": "low", "layer4": "out"}
    body = IntermediateLayerGetter(resnet, return_layers=layers)
    head = DeepLabHead(channels["layer4"], num_classes, atrous_rates=tuple(aspp_rates))
    head[0].project[3].p = dropout
    for branch in head[0].convs[1 : 1 + len(aspp_rates)]:  # the atrous branches (torchvision ASPPConv)
        branch[0] = atrous_conv(branch[0])
    decoder = None
    if decoder_channels is not None:
        decoder = LowLevelDecoder(channels["layer1"], head[1].out_channels, out_channels=decoder_channels)
        head[4] = nn.Conv2d(decoder_channels, num_classes, 1)
    frozen = frozen_stage_names(freeze_blocks)
    for name in frozen:
        getattr(body, name).requires_grad_(False)
    return DeepLabV3(body, head, frozen, decoder)


ARCHITECTURE = ("backbone", "output_stride", "aspp_rates", "freeze_blocks", "decoder_channels")


def architecture_of(config) -> dict:
    """The :func:`build_deeplab` keyword arguments held by a ``deeplab`` params section (by field name)."""
    return {name: getattr(config, name) for name in ARCHITECTURE}


def deeplab_from_bundle(bundle: dict) -> DeepLabV3:
    """The DeepLab of a ``model.pt`` bundle (:mod:`unseg.models.bundle`), weights loaded, in eval mode."""
    return load_state(build_deeplab(bundle["num_classes"], **bundle["architecture"]), bundle)


def set_train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, then the frozen stages back to eval so their BatchNorm statistics stay fixed.

    The released ``freeze_layers`` does the same at the start of every epoch (reference.md §1.1).
    Works on a DDP-wrapped model.
    """
    model.train()
    inner = unwrap(model)
    for name in inner.frozen:
        getattr(inner.backbone, name).eval()
    return model


# ---------------------------------------------------------------- loss


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    top_fraction: float = 0.2,
    ignore_index: int = 255,
    count: str = "all",
) -> torch.Tensor:
    """Cross-entropy averaged over the hardest pixels of the batch (MaskDistill Eq. 4, hard pixel mining).

    l_i = -log softmax(logits_i)[y_i] for every pixel i with y_i != ignore_index; the loss is the mean
    of the k largest l_i over the whole batch (B, H, W), with
    - ``count='all'`` (released ``losses.py``, reference.md §1.4 item 9):
      k = min(int(top_fraction * B*H*W), number of valid pixels), ignored pixels counted;
    - ``count='valid'``: k = int(top_fraction * number of valid pixels).
    ``top_fraction = 1`` gives plain cross-entropy over valid pixels. Eq. 4's extra 1/|C| is a
    constant factor and is left out, as in the released code. logits (B, C, H, W) float, target
    (B, H, W) long. No valid pixel: a zero that still carries the graph.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise UserError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if count not in ("all", "valid"):
        raise UserError(f"ohem count must be 'all' or 'valid', got {count!r}")
    losses = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid_losses = losses[target != ignore_index]
    base = losses.numel() if count == "all" else valid_losses.numel()
    k = min(int(top_fraction * base), valid_losses.numel())
    if k == 0:
        return logits.sum() * 0.0
    return torch.topk(valid_losses, k, sorted=False).values.mean()


# ---------------------------------------------------------------- data


def _to_hwc_numpy(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 or float tensor/array -> (H, W, 3) float32 in [0, 1]."""
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise UserError(f"expected an image of shape (3, H, W), got {arr.shape}")
    arr = np.ascontiguousarray(arr.transpose(1, 2, 0))
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def train_augment(
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    gen: torch.Generator,
    crop_size: int | tuple[int, int],
    scale_range: tuple[float, float] = (0.75, 1.25),
    max_rotation: float = 5.0,
    flip_p: float = 0.5,
    label_fill: int = 255,
    image_interp: str = "cubic",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released training augmentation: flip, ScaleNRotate, FixedResize (reference.md §1.2 "train aug").

    1. horizontal flip with probability ``flip_p``;
    2. one affine warp about the image centre (``cv2.getRotationMatrix2D``): rotation uniform in
       [-max_rotation, max_rotation] degrees, zoom uniform in ``scale_range``; output keeps the input
       size; image interpolation ``image_interp`` with 0 outside, label nearest with ``label_fill``
       outside (the released code fills 0 = background there: use ``label_fill=0`` to match it);
    3. resize to ``crop_size`` (H, W) ignoring the aspect ratio (released ``FixedResize`` 512x512).
    Randomness comes only from ``gen`` (three draws: flip, rotation, scale). image (3, H, W) uint8 or
    float in [0, 1]; label (H, W) integer. Returns (3, h, w) float32 in [0, 1] and (h, w) int64.
    """
    interp = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR}.get(image_interp)
    if interp is None:
        raise UserError(f"image_interp must be 'cubic' or 'linear', got {image_interp!r}")
    img = _to_hwc_numpy(image)
    lab = (label.detach().cpu().numpy() if torch.is_tensor(label) else np.asarray(label)).astype(np.uint8)
    if lab.shape != img.shape[:2]:
        raise UserError(f"label shape {lab.shape} differs from image shape {img.shape[:2]}")
    flip = float(torch.rand((), generator=gen)) < flip_p
    angle = uniform(gen, -max_rotation, max_rotation)
    scale = uniform(gen, *scale_range)
    if flip:
        img, lab = img[:, ::-1], lab[:, ::-1]
    h, w = lab.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    img = cv2.warpAffine(np.ascontiguousarray(img), matrix, (w, h), flags=interp, borderValue=(0.0, 0.0, 0.0))
    lab = cv2.warpAffine(
        np.ascontiguousarray(lab), matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=int(label_fill)
    )
    out_h, out_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    img = cv2.resize(img, (out_w, out_h), interpolation=interp)
    lab = cv2.resize(lab, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
    image_t = torch.from_numpy(np.clip(img, 0.0, 1.0).transpose(2, 0, 1).copy())
    return image_t, torch.from_numpy(lab.astype(np.int64))


# ---------------------------------------------------------------- train and predict


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> None:
    """Stop with one line when a pseudo-label id is outside 0..num_classes-1 (and not ``ignore_index``)."""
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= num_classes))]
    if bad.numel():
        raise UserError(f"labels contain class id {int(bad[0])} but the model has {num_classes} classes")


def deeplab_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    top_fraction: float = 0.2,
    ignore_index: int = 255,
    count: str = "all",
    amp: bool = False,
) -> dict[str, float]:
    """One SGD step on ``ohem_cross_entropy``; images (B, 3, H, W) float [0, 1], labels (B, H, W) long."""
    set_train_mode(model)
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    with autocast(device, amp):
        logits = model(images)
    loss = ohem_cross_entropy(logits, labels, top_fraction, ignore_index, count)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach())}


@torch.no_grad()
def predict_semantic(
    model: nn.Module,
    image: torch.Tensor,
    device: torch.device,
    return_logits: bool = False,
    amp: bool = False,
    input_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Argmax class map (H, W) int64 of one image (3, H, W) (uint8 or float [0, 1]) at its own resolution.

    With ``input_size`` the image is resized to the training resolution first and the logits are
    upsampled back (bilinear), so objects have the scale the model was trained on; the score is always
    computed at the original resolution (paper App. A.3). With ``return_logits``
    also returns the (C, H, W) float32 logits (e.g. for a CRF). Results are on the CPU.
    """
    model.eval()
    x = _model_input(image, input_size).to(device)
    with autocast(device, amp):
        logits = model(x)[0].float()
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    pred = logits.argmax(0).cpu()
    return (pred, logits.cpu()) if return_logits else pred


# ---------------------------------------------------------------- training on the harness


class SemanticBatches:
    """``make_batch(indices, step)``: augmented (images, labels) of a training step, a pure function of the step."""

    def __init__(
        self,
        images,
        labels,
        crop_size: int,
        scale_range,
        max_rotation: float,
        flip_p: float,
        label_fill: int,
        seed: int,
        num_classes: int | None = None,
    ):
        self.images, self.labels = images, labels  # callables: index -> (3, H, W) image / (H, W) labels
        self.num_classes = num_classes  # when given, every label map is checked once against it
        self.checked: set[int] = set()
        self.kw = dict(
            crop_size=crop_size,
            scale_range=scale_range,
            max_rotation=max_rotation,
            flip_p=flip_p,
            label_fill=label_fill,
        )
        self.seed = seed

    def label(self, i: int) -> torch.Tensor:
        lab = torch.as_tensor(np.asarray(self.labels(i)))
        if self.num_classes is not None and i not in self.checked:
            check_labels(lab, self.num_classes)
            self.checked.add(i)
        return lab

    def __call__(self, indices: Sequence[int], step: int):
        from unseg.train.harness import generator, step_seed

        pairs = [
            train_augment(self.images(i), self.label(i), generator(step_seed(self.seed, step, 1000 + i)), **self.kw)
            for i in indices
        ]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@dataclass(frozen=True)
class DeepLabTraining:
    """The optimisation of :func:`train_deeplab` (built from the ``deeplab`` params by field name)."""

    epochs: int
    batch_size: int
    lr: float
    lr_step_epochs: Sequence[int] = ()
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ohem_fraction: float = 0.2
    ohem_count: str = "all"
    ohem_warmup_epochs: int = 0
    seed: int = 0
    amp: bool = True
    workers: int = 0
    ckpt_every: int = 100


def train_deeplab(
    model: nn.Module,
    batches,
    n_images: int,
    t: DeepLabTraining,
    ckpt,
    log_path,
    device: torch.device,
    info=None,
    on_epoch_end=None,
) -> int:
    """SGD on hard-pixel-mined cross-entropy for ``t.epochs`` epochs; resumes from ``ckpt``. Returns steps run.

    The lr is multiplied by ``t.gamma`` after each epoch of ``t.lr_step_epochs`` (released: after 40 of 45).
    The first ``t.ohem_warmup_epochs`` epochs use plain cross-entropy (an extension for training from scratch,
    where mining the hardest 20 % of the pixels from the first step starves the easy ones); the rest use
    :func:`ohem_cross_entropy` with ``t.ohem_fraction``. ``on_epoch_end(epoch)`` is called after each
    completed epoch (used by the best-epoch reproduction flag).
    """
    from unseg.train import harness as H

    info = info or H.SINGLE_PROCESS
    model.to(device)
    ddp = H.wrap_ddp(model, info, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    steps_per_epoch = max(1, -(-n_images // t.batch_size))
    total = t.epochs * steps_per_epoch
    data = H.StepBatches(n_images, t.batch_size, t.seed, batches, info)

    def step_fn(step: int, batch) -> dict[str, float]:
        epoch = step // steps_per_epoch
        cur = H.step_decay(t.lr, epoch, t.lr_step_epochs, t.gamma)
        for g in opt.param_groups:
            g["lr"] = cur
        fraction = 1.0 if epoch < t.ohem_warmup_epochs else t.ohem_fraction
        images, labels = batch
        out = deeplab_train_step(ddp, opt, images, labels, device, fraction, 255, t.ohem_count, t.amp)
        if on_epoch_end is not None and (step + 1) % steps_per_epoch == 0:
            on_epoch_end((step + 1) // steps_per_epoch)
        return {**out, "lr": cur}

    return H.train_loop(
        step_fn,
        lambda start: H.step_loader(data, start, total, t.workers),
        {"model": model, "optimizer": opt},
        total,
        ckpt,
        log_path,
        t.ckpt_every,
        t.seed,
        info,
        desc="deeplab",
    )


def _model_input(image: torch.Tensor, input_size: int | None) -> torch.Tensor:
    """(3, H, W) uint8/float image -> (1, 3, h, w) float in [0, 1], resized to input_size^2 when given
    (the training resolution: the released code trains and tests at a fixed 512 x 512)."""
    x = (image.float() / 255.0 if image.dtype == torch.uint8 else image.float())[None]
    if input_size is not None:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def deeplab_features(
    model: DeepLabV3,
    images: Sequence[torch.Tensor],
    device: torch.device,
    input_size: int | None = None,
    kinds: Sequence[str] = ("backbone", "head"),
) -> dict[str, list[torch.Tensor]]:
    """Frozen features (D, h, w) of each image (3, H, W) for the linear protocols, per kind:

    ``backbone``: the dilated ResNet's last stage (the paper's linear probe, App. A.2);
    ``head``: the input of the final 1x1 classifier ``head[4]`` (what the released ``linear_finetune.py``
    re-fits). Both at the model's output stride (``head`` with a decoder: stride 4), both from one backbone
    pass; images of one size (all of them when ``input_size`` is set) go through as one batch.
    """
    unknown = set(kinds) - {"backbone", "head"}
    if unknown:
        raise ValueError(f"kinds must be 'backbone' or 'head', got {sorted(unknown)}")
    model.eval()
    xs = [_model_input(image, input_size) for image in images]
    groups = [xs] if len({tuple(x.shape) for x in xs}) == 1 else [[x] for x in xs]
    out: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    for group in groups:
        x = torch.cat(group).to(device)
        if "head" in kinds:
            last, head = model.features(x)
            out["head"].extend(f.float().cpu() for f in head)
        else:
            last = model.backbone((x - model.mean) / model.std)["out"]
        if "backbone" in kinds:
            out["backbone"].extend(f.float().cpu() for f in last)
    return out


def predict_entries(model: nn.Module, entries: Sequence, device, amp: bool, input_size: int | None) -> list[np.ndarray]:
    """The uint8 argmax map of each index entry's image at its original resolution."""
    out = []
    for e in progress(entries, desc="predict"):
        image = torch.from_numpy(read_image(e)).permute(2, 0, 1)
        out.append(predict_semantic(model, image, device, amp=amp, input_size=input_size).numpy().astype(np.uint8))
    return out


class BestEpochOnVal:
    """Reproduction only (it uses labels, like the released code): after each epoch, the validation mIoU
    (Hungarian) of ``model``; the best epoch's weights are kept in ``best_file``. Call it as ``on_epoch_end``."""

    def __init__(self, model: nn.Module, index, val: Sequence, n_pred: int, best_file, device, amp, input_size, main):
        self.model, self.index, self.val, self.n_pred = model, index, list(val), n_pred
        self.best_file, self.device, self.amp, self.input_size, self.main = best_file, device, amp, input_size, main

    def __call__(self, epoch: int) -> None:
        acc = ConfusionAccumulator(self.n_pred, len(self.index.classes), self.index.ignore_index)
        preds = predict_entries(self.model, self.val, self.device, self.amp, self.input_size)
        for pred, e in zip(preds, self.val, strict=True):
            acc.update(pred, self.index.read_semantic(e))
        score = evaluate_clusters(acc.matrix)["hungarian"]["miou"]
        best = read_checkpoint(self.best_file, "best epoch") if self.best_file.exists() else {"miou": -1.0}
        if score > best["miou"] and self.main:
            save_checkpoint({"miou": score, "epoch": epoch, "state": self.model.state_dict()}, self.best_file)
