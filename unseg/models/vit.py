"""Vision transformers from timm, with access to the last block's queries and keys.

The models are plain ``timm`` ViTs created by name; nothing is forked. The last block's
``attn.qkv`` linear layer is observed with a forward hook, which gives q and k *before* the
1/sqrt(d) scale and before any softmax, computed on ``norm1(x)`` (MaskDistill, Sec. 3.2 and
its released ``gen_masks.py``; CrOC's ``which_features='k'``). This also works when timm uses
fused attention, which never materialises q and k itself.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from unseg.errors import UserError
from unseg.models.checkpoint import read_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


STEMS = ("patch", "conv")


def conv_stem(patch_size: int, dim: int) -> nn.Sequential:
    """Xiao et al. 2021 ("Early convolutions help transformers see better"): log2(patch) 3x3 stride-2
    conv-BN-ReLU layers (widths dim/2^(n-1) ... dim) and a 1x1 conv to ``dim``, in place of the single
    patch x patch "patchify" conv. Same stride, so the token grid is unchanged."""
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << n != patch_size:
        raise UserError(f"backbone.stem: conv needs a power-of-two patch size, backbone.patch_size is {patch_size}")
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(n):
        c_out = max(16, dim >> (n - 1 - i))
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, dim, 1))
    return nn.Sequential(*layers)


def create_vit(
    arch: str,
    patch_size: int | None = None,
    depth: int | None = None,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    reg_tokens: int = 0,
    stem: str = "patch",
) -> nn.Module:
    """A randomly initialised timm ViT that accepts any input size (pos-embed interpolated).

    ``patch_size`` and ``depth`` override the architecture's defaults when given, so
    ``vit_tiny_patch16_224`` with ``patch_size=8, depth=4`` is a 4-block ViT-Ti/8. ``reg_tokens`` adds
    register tokens (Darcet et al. 2024) after the CLS token; they are prefix tokens, never mined.
    ``stem="conv"`` replaces the patchify conv by :func:`conv_stem` (the blocks, q/k and grid are unchanged).
    """
    kwargs: dict = dict(
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
    )
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if depth is not None:
        kwargs["depth"] = depth
    if reg_tokens:
        kwargs["reg_tokens"] = reg_tokens
    try:
        model = timm.create_model(arch, **kwargs)
    except RuntimeError as err:  # unknown model name
        raise UserError(f"backbone.arch: timm has no model {arch!r} ({err})") from err
    if not hasattr(model, "blocks") or not hasattr(model.blocks[-1], "attn"):
        raise UserError(f"backbone.arch: {arch!r} is not a plain ViT with attention blocks")
    if stem not in STEMS:
        raise UserError(f"backbone.stem must be one of {STEMS}, got {stem!r}")
    if stem == "conv":
        model.patch_embed.proj = conv_stem(vit_patch_size(model), model.embed_dim)
    return model


def vit_stem(model: nn.Module) -> str:
    return "conv" if isinstance(model.patch_embed.proj, nn.Sequential) else "patch"


def _state_stem(state: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(stem, patch size, embed dim) of a ViT state dict, None when it has no patch embedding."""
    if "patch_embed.proj.weight" in state:
        w = state["patch_embed.proj.weight"]
        return "patch", int(w.shape[-1]), int(w.shape[0])
    convs = sorted(
        (k for k, v in state.items() if k.startswith("patch_embed.proj.") and k.endswith(".weight") and v.ndim == 4),
        key=lambda k: int(k.split(".")[2]),
    )
    if not convs:
        return None
    strided = sum(1 for k in convs if state[k].shape[-1] == 3)
    return "conv", 1 << strided, int(state[convs[-1]].shape[0])


def vit_patch_size(model: nn.Module) -> int:
    return int(model.patch_embed.patch_size[0])


@dataclass
class ViTOutput:
    """What one forward pass gives.

    cls_token: (B, D) CLS token after the final LayerNorm.
    tokens:    (B, P + N, D) all output tokens after the final LayerNorm (P prefix tokens first).
    q, k:      (B, H, P + N, d) last-block queries and keys, raw (no scale, no softmax).
    num_prefix: P, the number of prefix tokens (CLS and registers) before the N patch tokens.
    grid:      (h, w) patch grid of the input.
    """

    cls_token: torch.Tensor
    tokens: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    num_prefix: int
    grid: tuple[int, int]

    @property
    def patch_keys(self) -> torch.Tensor:
        """(B, N, H*d): patch-token keys concatenated over heads."""
        k = self.k[:, :, self.num_prefix :]
        return k.permute(0, 2, 1, 3).flatten(2)

    @property
    def cls_logits(self) -> torch.Tensor:
        """(B, N, H): per-head raw CLS affinity q_CLS(h) . k_j(h) for each patch token j (Eq. 1 before averaging)."""
        q_cls = self.q[:, :, 0]  # (B, H, d)
        k = self.k[:, :, self.num_prefix :]  # (B, H, N, d)
        return torch.einsum("bhd,bhnd->bnh", q_cls, k)

    @property
    def patch_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.num_prefix :]


def forward_with_qk(model: nn.Module, images: torch.Tensor) -> ViTOutput:
    """Run ``model`` on ``images`` (B, 3, H, W), H and W multiples of the patch size."""
    block = model.blocks[-1]
    attn = block.attn
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["qkv"] = output

    handle = attn.qkv.register_forward_hook(hook)
    try:
        tokens = model.forward_features(images)
    finally:
        handle.remove()
    qkv = captured["qkv"]
    b, n, _ = qkv.shape
    heads = attn.num_heads
    qkv = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    p = vit_patch_size(model)
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    prefix = int(model.num_prefix_tokens)
    return ViTOutput(cls_token=tokens[:, 0], tokens=tokens, q=q, k=k, num_prefix=prefix, grid=grid)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = OrderedDict()
    for name, value in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = value
    return out


def vit_state_dict_from_checkpoint(obj: dict, key: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone weights inside an official DINO file, a DINO/CrOC training checkpoint or a timm state dict.

    Official DINO backbone files are plain state dicts; DINO (and our CrOC) training checkpoints hold
    ``teacher``/``student`` dicts whose names start with ``module.`` and/or ``backbone.``; projection-head
    weights (``head.*``) are dropped.
    """
    if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    elif "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    state = _strip_prefixes(obj)
    return OrderedDict((k, v) for k, v in state.items() if torch.is_tensor(v) and not k.startswith("head."))


def check_vit_compatible(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Stop with one clear line when a checkpoint does not fit the configured architecture."""
    want_p = vit_patch_size(model)
    found = _state_stem(state)
    if found is None:
        raise UserError(f"{source}: no patch embedding ('patch_embed.proj.*') found; not a ViT checkpoint")
    stem, patch, dim = found
    if stem != vit_stem(model):
        raise UserError(f"{source}: checkpoint has a {stem} stem, backbone.stem is {vit_stem(model)}")
    if patch != want_p:
        raise UserError(f"{source}: checkpoint has patch size {patch}, backbone.patch_size is {want_p}")
    if dim != model.embed_dim:
        raise UserError(f"{source}: checkpoint has embed dim {dim}, backbone.arch gives {model.embed_dim}")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if depth != len(model.blocks):
        raise UserError(f"{source}: checkpoint has {depth} blocks, the configured backbone has {len(model.blocks)}")


def load_vit_weights(model: nn.Module, path: str | Path, key: str = "teacher") -> None:
    """Load backbone weights from ``path`` into ``model`` in place, interpolating the position embedding."""
    path = Path(path)
    state = vit_state_dict_from_checkpoint(read_checkpoint(path, "backbone.weights"), key)
    check_vit_compatible(model, state, str(path))
    pe = state.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(grid), num_prefix_tokens=prefix)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not match the backbone (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def save_dino_checkpoint(model: nn.Module, path: str | Path, meta: dict, student: nn.Module | None = None) -> None:
    """Save ``model`` as the teacher of a DINO-style training checkpoint (``backbone.``-prefixed names).

    The same loader (:func:`load_vit_weights`) reads this file and official DINO files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def prefixed(m: nn.Module) -> dict:
        return OrderedDict((f"backbone.{k}", v.detach().cpu()) for k, v in m.state_dict().items())

    obj = {"teacher": prefixed(model), "meta": meta}
    if student is not None:
        obj["student"] = prefixed(student)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    import os

    os.replace(tmp, path)
