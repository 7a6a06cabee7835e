"""Part segmentation network: the ReCon encoder with the reference's segmentation head.

As the released ``segmentation/models/pt.py`` (Point-MAE head plus ReCon's query tokens):

1. grouping (128 groups of 32 points for 2,048 points) and the ReCon encoder, every group visible;
2. the patch rows of blocks 4, 8 and 12 (``feature_blocks`` = 3, 7, 11), each through the
   encoder's final LayerNorm, concatenated → per-group features [B, G, 3C];
3. one feature per shape: max and mean over groups of those (2 × 3C), the max over the three
   query rows of the last block (C; not normalised, as the reference), and the category's
   one-hot through ``label_embed`` = Conv1d(K, 64, no bias), BN, LeakyReLU(0.2) (64);
4. feature propagation from the group centres to every point: inverse-distance weights of the
   3 nearest centres (1 / (d² + 1e-8), normalised), the interpolated group features
   concatenated after the point's own xyz, then Conv1d + BN + ReLU to 4C and to 1024;
5. the head on concat[propagated (1024), shape feature]: Conv1d → 512, BN, ReLU, Dropout(0.5),
   Conv1d → 256, BN, ReLU, Conv1d → parts. ``forward`` returns logits [B, N, parts]; the
   reference's log-softmax + NLL is cross entropy on them.

Initialisation as the reference: it never calls an init function on this model, so every layer
keeps PyTorch's default, the query tokens start at zero and their positions at N(0, 1); a
checkpoint then overwrites the encoder (``load_encoder``), the new layers stay as they are.

Computation differs from the reference only in form: the interpolation is a [N, G] weight matrix
with three non-zeros per row (one batched matmul instead of a gather), the first head layer adds
the per-shape part of its product once per shape instead of repeating the shape feature at
every point, and d² comes from coordinate differences (exactly 0 for a point that is a centre;
the reference's |a|² - 2ab + |b|² leaves ±1e-7 there, where 1 / (d² + 1e-8) can flip sign).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from recon.network.model import MiniPointNet, ReConConfig, ReConEncoder, init_pytorch_default
from recon.network.pointops import group_points, pairwise_sq_dist_exact
from recon.network.reference import init_classifier_from_pretrain, reference_name

#: The reference's encoder settings for 2,048-point ShapeNetPart clouds.
REFERENCE_ENCODER = dict(num_group=128, group_size=32, drop_path_rate=0.1)


@dataclass
class PartSegConfig:
    """The segmentation head (defaults = the reference for ShapeNetPart)."""

    num_parts: int = 50
    num_categories: int = 16
    feature_blocks: tuple[int, ...] = (3, 7, 11)   # encoder blocks whose patch rows are used
    label_dim: int = 64
    propagation_dims: tuple[int, ...] | None = None  # None: (4C, 1024) as the reference
    head_dims: tuple[int, int] = (512, 256)
    dropout: float = 0.5
    neighbours: int = 3                              # centres each point interpolates from

    def __post_init__(self) -> None:
        self.feature_blocks = tuple(self.feature_blocks)
        self.head_dims = tuple(self.head_dims)
        if self.propagation_dims is not None:
            self.propagation_dims = tuple(self.propagation_dims)


def reference_encoder_config(variant: str = "base", **overrides) -> ReConConfig:
    """A variant's encoder with the reference segmentation grouping (128 × 32, drop path 0.1)."""
    return ReConConfig.variant(variant, **{**REFERENCE_ENCODER, **overrides})


def pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A kernel-1 Conv1d applied to channels-last rows [..., C_in] → [..., C_out]."""
    return MiniPointNet._pointwise(conv, x)


def interpolation_weights(xyz: Tensor, centers: Tensor, k: int = 3) -> Tensor:
    """[B, N, G] weights of every point on its k nearest centres (k <= G; inverse squared
    distance, summing to 1; zero elsewhere). Computed in float32, also under autocast."""
    with torch.autocast(device_type=xyz.device.type, enabled=False):
        d = pairwise_sq_dist_exact(xyz.float(), centers.float())
        near, idx = d.topk(k, dim=-1, largest=False, sorted=True)
        recip = 1.0 / (near + 1e-8)
        weight = recip / recip.sum(dim=-1, keepdim=True)
        return torch.zeros_like(d).scatter(2, idx, weight)


class FeaturePropagation(nn.Module):
    """Group features → every point (3-NN inverse-distance interpolation), then shared
    Conv1d + BN + ReLU layers on concat[point features, interpolated]."""

    def __init__(self, in_dim: int, dims: tuple[int, ...], neighbours: int = 3) -> None:
        super().__init__()
        self.neighbours = neighbours
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        for out_dim in dims:
            self.convs.append(nn.Conv1d(in_dim, out_dim, 1))
            self.bns.append(nn.BatchNorm1d(out_dim))
            in_dim = out_dim

    def forward(self, xyz: Tensor, centers: Tensor, point_features: Tensor | None,
                group_features: Tensor) -> Tensor:
        """xyz [B,N,3], centers [B,G,3], point_features [B,N,D1] or None, group_features [B,G,D2]
        → [B,N,dims[-1]]."""
        weights = interpolation_weights(xyz, centers, self.neighbours).to(group_features.dtype)
        x = torch.bmm(weights, group_features)
        if point_features is not None:
            x = torch.cat([point_features.to(x.dtype), x], dim=-1)
        B, N, _ = x.shape
        x = x.reshape(B * N, -1)           # BN over [B*N, C] = BN over [B, C, N]
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(pointwise(conv, x)))
        return x.reshape(B, N, -1)


class PartSegHead(nn.Module):
    """Per-point classifier on concat[point feature, shape feature]."""

    def __init__(self, point_dim: int, shape_dim: int, dims: tuple[int, int], num_parts: int,
                 dropout: float) -> None:
        super().__init__()
        self.point_dim = point_dim
        self.conv1 = nn.Conv1d(point_dim + shape_dim, dims[0], 1)
        self.bn1 = nn.BatchNorm1d(dims[0])
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(dims[0], dims[1], 1)
        self.bn2 = nn.BatchNorm1d(dims[1])
        self.conv3 = nn.Conv1d(dims[1], num_parts, 1)

    def forward(self, point_features: Tensor, shape_features: Tensor) -> Tensor:
        """[B,N,Dp], [B,Ds] → logits [B,N,parts]. conv1 over the concatenation = its point
        columns per point + its shape columns once per shape."""
        B, N, _ = point_features.shape
        w = self.conv1.weight.squeeze(-1)
        x = F.linear(point_features, w[:, :self.point_dim], self.conv1.bias)
        x = x + F.linear(shape_features, w[:, self.point_dim:]).unsqueeze(1)
        x = self.dropout(F.relu(self.bn1(x.reshape(B * N, -1))))
        x = F.relu(self.bn2(pointwise(self.conv2, x)))
        return pointwise(self.conv3, x).reshape(B, N, -1)


class ReConPartSeg(nn.Module):
    """ReCon encoder + segmentation head: points [B,N,3] and categories [B] → logits [B,N,parts]."""

    def __init__(self, cfg: ReConConfig, seg: PartSegConfig | None = None) -> None:
        super().__init__()
        seg = seg or PartSegConfig()
        if cfg.architecture != "recon":
            raise ValueError(f"part segmentation reads the ReCon encoder's blocks; architecture {cfg.architecture!r} "
                             "(a Table 9 baseline of `recon study`) is not supported")
        bad = [i for i in seg.feature_blocks if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"feature_blocks {bad} outside the encoder's {cfg.depth} blocks")
        self.cfg, self.seg = cfg, seg
        C, k = cfg.trans_dim, len(seg.feature_blocks)
        self.encoder = ReConEncoder(cfg)
        self.label_embed = nn.Sequential(nn.Conv1d(seg.num_categories, seg.label_dim, 1, bias=False),
                                         nn.BatchNorm1d(seg.label_dim), nn.LeakyReLU(0.2))
        prop_dims = seg.propagation_dims or (4 * C, 1024)
        self.propagation = FeaturePropagation(k * C + 3, prop_dims, min(seg.neighbours, cfg.num_group))
        shape_dim = 2 * k * C + C + seg.label_dim
        self.head = PartSegHead(prop_dims[-1], shape_dim, seg.head_dims, seg.num_parts, seg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the reference model is built: PyTorch's default for every layer, query tokens zero,
        their positions N(0, 1)."""
        init_pytorch_default(self)
        for name in ReConEncoder.QUERY_NAMES:
            nn.init.zeros_(getattr(self.encoder, f"{name}_token"))
            nn.init.normal_(getattr(self.encoder, f"{name}_pos"))

    def forward(self, points: Tensor, category: Tensor) -> Tensor:
        """points [B,N,3], category [B] int64 → logits [B,N,num_parts]."""
        neighborhood, center = group_points(points, self.cfg.num_group, self.cfg.group_size)
        return self.segment(points, neighborhood, center, category)

    def segment(self, points: Tensor, neighborhood: Tensor, center: Tensor, category: Tensor) -> Tensor:
        """The network after grouping (the export wraps it with its own grouping)."""
        enc = self.encoder(neighborhood, center, None, stop_grad=False)
        blocks = enc["block_outputs"]
        q = self.cfg.num_queries
        groups = torch.cat([self.encoder.norm(blocks[i][:, q:]) for i in self.seg.feature_blocks], -1)
        queries = blocks[-1][:, :q].max(dim=1).values
        one_hot = F.one_hot(category, self.seg.num_categories).to(groups.dtype).unsqueeze(-1)
        label = self.label_embed(one_hot).squeeze(-1)
        shape = torch.cat([groups.max(dim=1).values, groups.mean(dim=1), queries, label], dim=-1)
        per_point = self.propagation(points, center, points, groups)
        return self.head(per_point, shape)

    def lr_boost_names(self) -> list[str]:
        """Parameters the reference trains at 10× the learning rate: those whose reference name
        contains ``conv`` outside the encoder, i.e. the label embedding (its BatchNorm too, named
        ``label_conv.1``) and the propagation and head convs, not their BatchNorms."""
        out = []
        for name, _ in self.named_parameters():
            ref = reference_name(name, "partseg")
            if ref is not None and "conv" in ref and "encoder" not in ref:
                out.append(name)
        return out


def load_encoder(model: ReConPartSeg, state_dict: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy the ``encoder.*`` weights of an our-named state dict (a pretraining ``model.pt``, a
    converted reference checkpoint, or a fine-tuned classifier) into ``model``; the segmentation
    layers keep their initialisation. Returns (missing model keys, ignored checkpoint keys);
    raises ValueError when encoder weights are missing."""
    missing, ignored = init_classifier_from_pretrain(model, state_dict)
    lacking = [k for k in missing if k.startswith("encoder.")]
    if lacking:
        raise ValueError(f"the checkpoint lacks encoder weights {lacking[:5]}{' ...' if len(lacking) > 5 else ''}")
    return missing, ignored
