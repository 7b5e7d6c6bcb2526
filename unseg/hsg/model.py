"""HSG's networks (reference.md §3.1): a ResNet FCN with a 128-d pixel embedding and a learned positional
embedding, and the DETR-style clustering transformer that groups segments into the fine level and maps fine
groups to coarse ones.

The embedding net is a torchvision ResNet (``unseg.models.resnet``), so its trunk loads into the Mask R-CNN and
DeepLab backbones as is: layer4 dilated (output stride 16 in training, as released; layer3 too for 8 at test),
then ``conv_out`` = 1x1-BN-ReLU-1x1 to the embedding. The positional embedding is DETR's learned one: a row and
a column table (50 entries of dim/2 each) concatenated.

The clustering transformer (d 128, 4 heads, 2 encoder + 2 decoder layers, FFN 256, dropout 0.1) is DETR's, as
released: the segments' positional embeddings join the queries and keys of every attention, never the values
(added to the input instead, the all-positive learned positions, ~6x the norm of a unit segment embedding,
made every segment look alike to the encoder); the decoder input is one target made from the memory's mean and
std through an MLP, with the C learned queries as query positions; centroid = MLP(decoder output), logits =
centroids . memory / sqrt(d), P = softmax over the C groups. Ours uses LayerNorm where the released code has
BatchNorm1d (a batch of padded segment sets makes BatchNorm statistics depend on the padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unseg.models.resnet import create_resnet, resnet_stage_channels


class LearnedPosition(nn.Module):
    """(h, w) -> (dim, h, w): concatenated learned row and column embeddings (DETR), tables of ``size``."""

    def __init__(self, dim: int = 128, size: int = 50):
        super().__init__()
        self.rows, self.cols = nn.Embedding(size, dim // 2), nn.Embedding(size, dim // 2)
        nn.init.uniform_(self.rows.weight)
        nn.init.uniform_(self.cols.weight)

    def forward(self, h: int, w: int, step: float = 1.0) -> torch.Tensor:
        """``step`` < 1 reads the tables at a finer grid over the same image area (entry floor(i * step))."""
        size, device = self.rows.num_embeddings, self.rows.weight.device
        ys = (torch.arange(h, device=device) * step).long().clamp(max=size - 1)
        xs = (torch.arange(w, device=device) * step).long().clamp(max=size - 1)
        return torch.cat(
            [self.rows(ys)[:, None, :].expand(h, w, -1), self.cols(xs)[None, :, :].expand(h, w, -1)], -1
        ).permute(2, 0, 1)


class EmbeddingFCN(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> unit pixel embeddings (B, dim, H/os, W/os) and positions (dim, h, w).

    ``trained_stride``: the output stride the weights were trained at, when it differs (released: trained at 16,
    tested at 8 with the same weights); the positional tables are then read at the trained grid's spacing."""

    def __init__(self, backbone: str = "resnet18", dim: int = 128, output_stride: int = 16,
                 trained_stride: int | None = None):  # fmt: skip
        super().__init__()
        self.position_step = output_stride / (trained_stride or output_stride)
        dilate = {16: (False, False, True), 8: (False, True, True), 32: (False, False, False)}[output_stride]
        self.resnet = create_resnet(backbone, dilate)
        self.resnet.fc = nn.Identity()
        c = resnet_stage_channels(self.resnet)["layer4"]
        self.conv_out = nn.Sequential(
            nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, dim, 1)
        )
        self.position = LearnedPosition(dim)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.resnet
        x = (images - self.mean) / self.std
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        emb = F.normalize(self.conv_out(x), dim=1)
        return emb, self.position(*emb.shape[-2:], self.position_step)


@dataclass
class Grouping:
    assign: torch.Tensor  # (C, n): each segment's distribution over the C groups (columns sum to 1)
    centroids: torch.Tensor  # (C, d): the groups' centroid features (input of the next level)


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: positions join the queries and keys of the attention, never its values,
    so what a segment carries forward is its content."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.drop1(self.attn(q, q, x, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ffn(x)))


class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer: self-attention of the queries (``query_pos`` on queries and keys), then
    cross-attention to the memory (``pos`` on its keys), then the FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self, t: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        q = t + query_pos
        t = self.norm1(t + self.drop1(self.self_attn(q, q, t, need_weights=False)[0]))
        t = self.norm2(t + self.drop2(self.cross_attn(t + query_pos, memory + pos, memory, need_weights=False)[0]))
        return self.norm3(t + self.drop3(self.ffn(t)))


class ClusteringTransformer(nn.Module):
    """n segment features (n, d) with positions (n, d) -> ``Grouping`` of C groups.

    As released (DETR's transformer): the encoder reads the segments with their positions on the attention's
    queries and keys; every decoder query starts from one target made from the memory's mean and std, and the
    C learned query embeddings enter as query positions; the weights start Xavier-uniform."""

    def __init__(self, groups: int, dim: int = 128, heads: int = 4, layers: int = 2, ffn: int = 256,
                 dropout: float = 0.1):  # fmt: skip
        super().__init__()
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ffn, dropout) for _ in range(layers))
        self.decoder = nn.ModuleList(DecoderLayer(dim, heads, ffn, dropout) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.target_init = nn.Sequential(nn.Linear(2 * dim, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, dim))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.queries = nn.Embedding(groups, dim)
        # BatchNorm over the C centroids, as released, standardises each feature across the groups, so the C
        # centroids differ from the first step (a LayerNorm here let them start alike: assignments sat at
        # uniform, where the grouping loss has no gradient); batch statistics at test too (no running ones)
        self.centroid = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim, bias=False),
                                      nn.BatchNorm1d(dim, track_running_stats=False))  # fmt: skip
        self.centroid_feats = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim, bias=False),
                                            nn.BatchNorm1d(dim, track_running_stats=False))  # fmt: skip

    def forward(self, segments: torch.Tensor, positions: torch.Tensor) -> Grouping:
        memory, pos = segments[None], positions[None]  # (1, n, d)
        for layer in self.encoder:
            memory = layer(memory, pos)
        stats = torch.cat([memory.mean(1), memory.std(1, unbiased=False)], -1)  # (1, 2d)
        query_pos = self.queries.weight[None]  # (1, C, d)
        target = self.target_init(stats)[:, None, :].expand_as(query_pos)
        for layer in self.decoder:
            target = layer(target, memory, pos, query_pos)
        out = self.decoder_norm(target)[0]  # (C, d)
        logits = self.centroid(out) @ memory[0].T / memory.shape[-1] ** 0.5  # (C, n)
        return Grouping(assign=logits.softmax(0), centroids=self.centroid_feats(out))
