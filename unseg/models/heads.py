"""Projection heads for DINO-style self-distillation (DINO, Caron et al. 2021; CrOC, reference.md §2.1/§2.2).

``DINOHead``: x (B, in_dim) -> MLP in_dim→hidden→hidden→bottleneck (GELU, no BN) -> L2-normalise ->
weight-normed linear bottleneck→out_dim without bias. Weight norm writes the last weight as
W = g · V / ||V|| (row-wise); with ``norm_last_layer`` the gain g is fixed to 1 (not trained), which is
DINO's recipe for stability.

``CrOCHead``: the same shared MLP with a second weight-normed last layer ``last_layer_c`` for the
cluster centroids (official ``models/vision_transformer.py: CrOCHead``): ``forward`` for the image-level
CLS output, ``forward_c`` for centroids.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from unseg.errors import UserError


def _init_linear(m: nn.Module) -> None:
    """DINO's init of the MLP: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def weight_normed_linear(in_dim: int, out_dim: int, norm_last_layer: bool = True) -> nn.Linear:
    """Bias-free linear layer with weight norm (``parametrizations.weight_norm``, dim 0) and gain g = 1.

    With ``norm_last_layer`` the gain (``parametrizations.weight.original0``) is frozen at 1, so each
    output row is a unit vector: logits are cosine similarities with the L2-normalised input.
    """
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    gain = layer.parametrizations.weight.original0
    with torch.no_grad():
        gain.fill_(1.0)
    if norm_last_layer:
        gain.requires_grad_(False)
    return layer


def projection_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, n_layers: int = 3) -> nn.Module:
    """DINO's projector MLP: ``n_layers`` linear layers with GELU in between (no BN), ending at the bottleneck."""
    if n_layers < 1:
        raise UserError(f"head n_layers must be >= 1, got {n_layers}")
    if n_layers == 1:
        mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
    else:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(n_layers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        mlp = nn.Sequential(*layers)
    mlp.apply(_init_linear)
    return mlp


class DINOHead(nn.Module):
    """x (B, in_dim) -> logits (B, out_dim) = last_layer(normalize(mlp(x))).

    Defaults follow DINO/CrOC: hidden 2048, bottleneck 256, 3 layers, ``norm_last_layer=True``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, n_layers)
        self.last_layer = weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, bottleneck) L2-normalised MLP output."""
        return nn.functional.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.embed(x))


class CrOCHead(DINOHead):
    """DINOHead plus ``last_layer_c`` (bottleneck→out_dim_c) for centroids; the MLP is shared.

    ``forward(x)``: image-level logits (B, out_dim); ``forward_c(x)``: centroid logits (V, out_dim_c).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        out_dim_c: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim, n_layers, norm_last_layer)
        self.last_layer_c = weight_normed_linear(bottleneck_dim, out_dim_c, norm_last_layer)

    def forward_c(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer_c(self.embed(x))


def cancel_last_layer_grads(head: nn.Module) -> None:
    """Drop the gradients of every parameter whose name contains ``last_layer`` (DINO's ``freeze_last_layer``;
    as in the official code this matches ``last_layer_c`` too, reference.md §2.5)."""
    for name, p in head.named_parameters():
        if "last_layer" in name:
            p.grad = None
