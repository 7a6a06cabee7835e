"""ReCon student network: point-patch Transformer with CLS/IMG/TXT query tokens.

Pretraining (``ReConPretrain``): masked point modelling (MAE decoder, Chamfer-L2) plus
distillation of the IMG / TXT queries onto frozen image / text teacher features. The
queries read the patch tokens through cross attention on a detached copy (stop-grad).
Fine-tuning (``ReConClassifier``): all groups visible, no stop-grad, MLP head on
concat[CLS, IMG, TXT, max over patches].

``ReConConfig.architecture`` swaps the encoder for the paper's Table 9 baselines (the default,
``recon``, is the model above, unchanged): ``multitask`` is one plain Transformer (``PlainEncoder``)
over [CLS, IMG, TXT, patches, mask tokens] whose masked patch rows take the reconstruction loss
through the rebuild head alone (no decoder) and whose queries take the distillation losses (no
stop-gradient: there is no cross attention); ``two_tower`` (``TwoTowerEncoder``) is a Point-MAE
reconstruction Transformer with its decoder beside a separate contrastive Transformer with the
queries, whose feature sequence concatenates both streams channel-wise (width 2C). Every encoder
returns the same sequence layout (rows 0-2 the queries, then the patches), so the probes, the
classifier head (4 × ``cfg.feature_dim`` wide) and the export read every architecture the same way.

Numerics follow the released reference code, so that its checkpoints load and give the same
outputs: the queries are rows 0-2 ([CLS], IMG, TXT) ahead of the patches, the positional sequence
is added before every block, a block's residual carries the normalised tensor (x = LN(x); x = x +
Attn(x); ...), the queries cross-attend to the patches only, one final LayerNorm serves queries and
patches, the decoder is pre-norm with a LayerNorm on the masked rows only, and Chamfer-L2 is
mean(dist1) + mean(dist2) of squared distances. tests/test_model_reference.py checks outputs,
losses and gradient norms against vectors computed with the reference code (the reference
fixtures, ``../shared/fixtures/reference/`` beside the clone).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from recon.network import losses as L
from recon.network.pointops import group_points

VARIANTS: dict[str, dict] = {
    "tiny": dict(trans_dim=192, num_heads=3, decoder_num_heads=3),
    "small": dict(trans_dim=256, num_heads=4, decoder_num_heads=4),
    "base": dict(trans_dim=384, num_heads=6, decoder_num_heads=6),
}
TARGETS = ("rec", "img", "text", "smc")
PROJ_NORMS = ("none", "batch")
#: recon: the ReCon encoder (two-branch blocks, stop-grad); multitask / two_tower: the paper's Table 9 baselines
ARCHITECTURES = ("recon", "multitask", "two_tower")


@dataclass
class ReConConfig:
    """Hyper-parameters of the student (defaults = base variant, pretraining)."""

    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    num_group: int = 64
    group_size: int = 32
    mask_ratio: float = 0.6
    drop_path_rate: float = 0.1
    img_feat_dim: int = 768
    text_feat_dim: int = 512
    stop_grad: bool = True
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    use_sdpa: bool = True            # F.scaled_dot_product_attention (matches explicit softmax)
    global_loss: str = "smooth_l1"   # smooth_l1 | l2 | cosine | infonce
    infonce_tau: float = 0.1
    smc_tau: float = 0.1
    targets: tuple[str, ...] = ("rec", "img", "text")   # subset of TARGETS
    loss_weights: dict[str, float] = field(default_factory=dict)  # e.g. {"img": 0.5}; default 1
    proj_norm: str = "none"          # none (the reference) | batch: BatchNorm (no affine) before img/text_proj
    embed_masked: bool = True        # the reference embeds every group; False: only the visible ones (pretraining)
    architecture: str = "recon"      # recon | multitask (one plain Transformer) | two_tower (two separate ones)
    img_queries: int = 1             # K learnable IMG queries (ReCon++; docs/reconpp.md); 1 = ReCon
    img_match: str = "none"          # K queries vs V views: none (query k <-> view k) | hungarian (per shape, min loss)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown targets {bad}; choose from {TARGETS}")
        if self.global_loss not in L.GLOBAL_LOSSES:
            raise ValueError(f"unknown global_loss {self.global_loss!r}")
        if self.proj_norm not in PROJ_NORMS:
            raise ValueError(f"unknown proj_norm {self.proj_norm!r}; choose from {PROJ_NORMS}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose from {ARCHITECTURES}")
        if self.trans_dim % self.num_heads or self.trans_dim % self.decoder_num_heads:
            raise ValueError("trans_dim must be divisible by the head counts")
        if self.img_queries < 1:
            raise ValueError(f"img_queries must be >= 1, not {self.img_queries}")
        if self.img_match not in L.MATCHES:
            raise ValueError(f"unknown img_match {self.img_match!r}; choose from {L.MATCHES}")
        if self.img_queries > 1 and self.architecture != "recon":
            raise ValueError(f"img_queries > 1 needs architecture recon, not {self.architecture!r}")
        if (self.img_queries > 1 or self.img_match != "none") and self.global_loss == "infonce":
            raise ValueError("several image queries or matched views need a per-pair loss (smooth_l1, l2, "
                             "cosine): InfoNCE's in-batch negatives would include the shape's own other views")

    @classmethod
    def variant(cls, name: str, **overrides) -> "ReConConfig":
        """``tiny`` (192/3), ``small`` (256/4) or ``base`` (384/6), plus field overrides."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    @property
    def feature_dim(self) -> int:
        """Width of the encoder's feature sequence: C, or 2C for two_tower (both streams side by side)."""
        return 2 * self.trans_dim if self.architecture == "two_tower" else self.trans_dim

    @property
    def num_queries(self) -> int:
        """Query rows ahead of the patches: [CLS, IMG_1..IMG_K, TXT] (3 for ReCon)."""
        return 2 + self.img_queries

    @property
    def num_mask(self) -> int:
        """Masked groups per cloud, int(mask_ratio * num_group) (38 of 64 by default)."""
        return int(self.mask_ratio * self.num_group)

    def replace(self, **changes) -> "ReConConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- layers


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or when p == 0)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) [B,H,Nq,Nk]: the weights :func:`attend` applies to v."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, use_sdpa: bool, record: list[Tensor] | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over [B,H,N,d] tensors. With a ``record`` list (only while
    :func:`record_attention` is active) the probabilities are also computed explicitly and appended,
    detached; the returned tensor is computed exactly as without it."""
    if record is not None:
        record.append(attention_probs(q, k).detach())
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v)
    return attention_probs(q, k) @ v


def split_heads(x: Tensor, heads: int) -> Tensor:
    B, N, C = x.shape
    return x.reshape(B, N, heads, C // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``qkv`` packs rows [q; k; v]."""

    record: list[Tensor] | None = None   # where attend appends the probabilities (record_attention)

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, use_sdpa: bool = True) -> None:
        super().__init__()
        self.heads, self.use_sdpa = heads, use_sdpa
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(attend(q, k, v, self.use_sdpa, self.record)))


class CrossAttention(nn.Module):
    """Queries ``x`` attend to ``context``; ``kv`` packs rows [k; v]."""

    record: list[Tensor] | None = None   # where attend appends the probabilities (record_attention)

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, use_sdpa: bool = True) -> None:
        super().__init__()
        self.heads, self.use_sdpa = heads, use_sdpa
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = split_heads(self.q(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        return self.proj(merge_heads(attend(q, k, v, self.use_sdpa, self.record)))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PositionalMLP(nn.Module):
    """Centre xyz -> Linear(3,128) -> GELU -> Linear(128,C)."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, xyz: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(xyz)))


class MiniPointNet(nn.Module):
    """Per-group patch embedding [B,G,S,3] -> [B,G,C] (two shared MLPs, two max-pools)."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 128, 1)
        self.bn1 = nn.BatchNorm1d(128)
        self.conv2 = nn.Conv1d(128, 256, 1)
        self.conv3 = nn.Conv1d(512, 512, 1)
        self.bn3 = nn.BatchNorm1d(512)
        self.conv4 = nn.Conv1d(512, out_dim, 1)

    def forward(self, groups: Tensor) -> Tensor:
        # Channels-last: a 1x1 Conv1d is a Linear over each point, and BatchNorm1d over [N, C]
        # has the same per-channel statistics as over [BG, C, S]. Same weights and numbers as
        # the Conv1d form, ~1.5x faster forward+backward on CPU (bench/README.md).
        B, G, S, _ = groups.shape
        x = groups.reshape(B * G * S, 3)
        x = self._pointwise(self.conv2, F.relu(self.bn1(self._pointwise(self.conv1, x))))
        x = x.reshape(B * G, S, -1)                                      # [BG,S,256]
        glob = x.max(dim=1, keepdim=True).values.expand(-1, S, -1)
        x = torch.cat([glob, x], dim=2).reshape(B * G * S, -1)           # global part first
        x = self._pointwise(self.conv4, F.relu(self.bn3(self._pointwise(self.conv3, x))))
        return x.reshape(B * G, S, -1).max(dim=1).values.reshape(B, G, -1)

    @staticmethod
    def _pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
        return F.linear(x, conv.weight.squeeze(-1), conv.bias)


# ----------------------------------------------------------------------------- blocks


class ReConBlock(nn.Module):
    """Two-branch block: patch self-attention + query cross-attention (separate weights).

    Residuals carry the *normalised* tensor (as released): x = LN1(x); x = x + Attn(x);
    x = LN2(x); x = x + MLP(x). The first ``num_queries`` rows are the queries ([CLS, IMG, TXT];
    with K image queries 2 + K), the rest are patches.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float = 0.0, use_sdpa: bool = True, num_queries: int = 3) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.num_queries = num_queries
        self.patch_norm1 = nn.LayerNorm(dim)
        self.patch_attn = SelfAttention(dim, heads, qkv_bias, use_sdpa)
        self.patch_norm2 = nn.LayerNorm(dim)
        self.patch_mlp = Mlp(dim, hidden)
        self.query_norm1 = nn.LayerNorm(dim)
        self.query_attn = CrossAttention(dim, heads, qkv_bias, use_sdpa)
        self.query_norm2 = nn.LayerNorm(dim)
        self.query_mlp = Mlp(dim, hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, stop_grad: bool) -> Tensor:
        q, p = x[:, :self.num_queries], x[:, self.num_queries:]
        q, p = self.query_norm1(q), self.patch_norm1(p)
        q = q + self.drop_path(self.query_attn(q, p.detach() if stop_grad else p))
        p = p + self.drop_path(self.patch_attn(p))
        q, p = self.query_norm2(q), self.patch_norm2(p)
        q = q + self.drop_path(self.query_mlp(q))
        p = p + self.drop_path(self.patch_mlp(p))
        return torch.cat([q, p], dim=1)


class DecoderBlock(nn.Module):
    """Standard pre-norm Transformer block: x + Attn(LN(x)); x + MLP(LN(x)). The reconstruction
    decoder's, and every block of the plain encoders (:class:`PlainEncoder`) of the baselines."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float = 0.0, use_sdpa: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, qkv_bias, use_sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_schedule(rate: float, depth: int) -> list[float]:
    return torch.linspace(0, rate, depth, device="cpu").tolist()


def init_weights(module: nn.Module) -> None:
    """The encoder side (reference ``MaskTransformer._init_weights``): Linear/Conv1d
    trunc-normal(0.02) with zero bias; LayerNorm/BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_decoder_weights(module: nn.Module) -> None:
    """The reconstruction decoder's blocks (reference ``TransformerDecoder._init_weights``):
    Linear xavier-uniform with zero bias; LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_projection_weights(module: nn.Module) -> None:
    """The teacher projections and the SMC head (reference ``ReCon._init_weights``): Linear
    normal(mean 0.02, std 0.01) with zero bias; BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.02, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_pytorch_default(module: nn.Module) -> None:
    """PyTorch's own initialisation (kaiming-uniform weights, fan-in-uniform biases; norms 1/0)
    of every layer in ``module``: what the reference leaves untouched."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.BatchNorm1d, nn.LayerNorm)):
            m.reset_parameters()


# ----------------------------------------------------------------------------- encoder


class ReConEncoder(nn.Module):
    """Patch embedding + [CLS, IMG, TXT] queries + ReCon blocks + shared final LayerNorm.

    With ``cfg.img_queries`` K > 1 (ReCon++) ``img_token`` / ``img_pos`` are [1,K,C] and the query
    rows are [CLS, IMG_1..IMG_K, TXT]; K = 1 is ReCon's layout, names and shapes."""

    QUERY_NAMES = ("cls", "img", "text")

    def __init__(self, cfg: ReConConfig) -> None:
        super().__init__()
        C = cfg.trans_dim
        self.patch_embed = MiniPointNet(C)
        self.pos_embed = PositionalMLP(C)
        self.embed_masked = cfg.embed_masked
        for name in self.QUERY_NAMES:
            rows = cfg.img_queries if name == "img" else 1
            setattr(self, f"{name}_token", nn.Parameter(torch.zeros(1, rows, C)))
            setattr(self, f"{name}_pos", nn.Parameter(torch.zeros(1, rows, C)))
        self.blocks = nn.ModuleList([
            ReConBlock(C, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dp, cfg.use_sdpa, cfg.num_queries)
            for dp in drop_path_schedule(cfg.drop_path_rate, cfg.depth)])
        self.norm = nn.LayerNorm(C)

    def queries(self, batch: int) -> tuple[Tensor, Tensor]:
        """Query tokens and their positions, each [B,Q,C] (Q = 3, or 2 + K)."""
        tok = torch.cat([getattr(self, f"{n}_token") for n in self.QUERY_NAMES], dim=1)
        pos = torch.cat([getattr(self, f"{n}_pos") for n in self.QUERY_NAMES], dim=1)
        return tok.expand(batch, -1, -1), pos.expand(batch, -1, -1)

    def forward(self, neighborhood: Tensor, center: Tensor, visible: Tensor | None = None,
                stop_grad: bool = False) -> dict[str, Tensor | list[Tensor]]:
        """Encode groups; only the groups listed in ``visible`` [B,V] (ascending, see
        :func:`split_groups`; None = all) enter the blocks.

        Returns ``group_tokens`` [B,G,C] (all groups; [B,V,C] when ``embed_masked`` is off),
        ``patch_pos`` [B,V,C], ``block_outputs`` (list of [B,Q+V,C]) and ``tokens`` = final LN
        output [B,Q+V,C] (Q = ``cfg.num_queries``: 3, or 2 + K).
        """
        group_tokens, x, patch_pos = embed_patches(self, neighborhood, center, visible)
        q_tok, q_pos = self.queries(group_tokens.shape[0])
        x = torch.cat([q_tok, x], dim=1)
        pos = torch.cat([q_pos, patch_pos], dim=1)
        block_outputs = []
        for block in self.blocks:
            x = block(x + pos, stop_grad)
            block_outputs.append(x)
        return dict(group_tokens=group_tokens, patch_pos=patch_pos,
                    block_outputs=block_outputs, tokens=self.norm(x))


def embed_patches(encoder: nn.Module, neighborhood: Tensor, center: Tensor,
                  visible: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Every encoder's first step: (``group_tokens`` [B,G,C] of ``encoder.patch_embed``, the tokens of
    the ``visible`` groups [B,V,C] (None: all) and their positions ``encoder.pos_embed`` [B,V,C]).

    The mini-PointNet is most of a small student's FLOPs, and a masked group's embedding is never
    used. The reference embeds them anyway (its BatchNorm statistics see every group);
    ``embed_masked=False`` makes the visible groups the only groups before embedding (``group_tokens``
    then [B,V,C]): same weights, same outputs in eval mode, batch statistics from the visible 40 % in
    training."""
    if visible is not None and not encoder.embed_masked:
        neighborhood, center, visible = take_rows(neighborhood, visible), take_rows(center, visible), None
    group_tokens = encoder.patch_embed(neighborhood)
    tokens, c = group_tokens, center
    if visible is not None:
        tokens, c = take_rows(group_tokens, visible), take_rows(center, visible)
    return group_tokens, tokens, encoder.pos_embed(c)


class PlainEncoder(nn.Module):
    """A standard Transformer encoder (Point-MAE's): the same patch embedding and positional MLP as
    ReCon, then pre-norm blocks (:class:`DecoderBlock`) with full self-attention over the whole
    sequence, positions re-added before every block, one final LayerNorm.

    With ``queries`` the [CLS, IMG, TXT] tokens (ReCon's names and positions) lead the sequence
    and every token attends to every other: the vanilla multi-task baseline. No cross attention,
    so no stop-gradient (``stop_grad`` is accepted for the common signature and ignored)."""

    QUERY_NAMES = ReConEncoder.QUERY_NAMES

    def __init__(self, cfg: ReConConfig, queries: bool = True) -> None:
        super().__init__()
        C = cfg.trans_dim
        self.patch_embed = MiniPointNet(C)
        self.pos_embed = PositionalMLP(C)
        self.embed_masked = cfg.embed_masked
        if queries:
            for name in self.QUERY_NAMES:
                setattr(self, f"{name}_token", nn.Parameter(torch.zeros(1, 1, C)))
                setattr(self, f"{name}_pos", nn.Parameter(torch.zeros(1, 1, C)))
        self.has_queries = queries
        self.blocks = nn.ModuleList([
            DecoderBlock(C, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dp, cfg.use_sdpa)
            for dp in drop_path_schedule(cfg.drop_path_rate, cfg.depth)])
        self.norm = nn.LayerNorm(C)

    queries = ReConEncoder.queries

    def forward(self, neighborhood: Tensor, center: Tensor, visible: Tensor | None = None,
                stop_grad: bool = False, masked: Tensor | None = None,
                mask_token: Tensor | None = None) -> dict[str, Tensor | list[Tensor]]:
        """As :meth:`ReConEncoder.forward`; with ``masked`` [B,M] and ``mask_token`` [1,1,C] the masked
        groups follow the visible ones as the mask token at their own positions (``tokens`` [B,3+V+M,C]:
        multi-task pretraining, whose masked rows take the reconstruction loss)."""
        queries = self.queries(neighborhood.shape[0]) if self.has_queries else None
        return self.encode_sequence(neighborhood, center, visible, queries, masked, mask_token)

    def encode_sequence(self, neighborhood: Tensor, center: Tensor, visible: Tensor | None,
                        queries: tuple[Tensor, Tensor] | None, masked: Tensor | None = None,
                        mask_token: Tensor | None = None) -> dict[str, Tensor | list[Tensor]]:
        """The blocks over [queries (tokens [B,Q,C], positions [B,Q,C]; None: none), visible patches,
        mask tokens of ``masked`` (optional)]; returns ``group_tokens``, ``patch_pos`` (visible),
        ``block_outputs`` and ``tokens`` (final LN), as :meth:`ReConEncoder.forward`."""
        masked_center = take_rows(center, masked) if masked is not None else None
        group_tokens, x, patch_pos = embed_patches(self, neighborhood, center, visible)
        pos = patch_pos
        if masked is not None:
            x = torch.cat([x, mask_token.expand(x.shape[0], masked.shape[1], -1)], dim=1)
            pos = torch.cat([pos, self.pos_embed(masked_center)], dim=1)
        if queries is not None:
            x, pos = torch.cat([queries[0], x], dim=1), torch.cat([queries[1], pos], dim=1)
        block_outputs = []
        for block in self.blocks:
            x = block(x + pos)
            block_outputs.append(x)
        return dict(group_tokens=group_tokens, patch_pos=patch_pos,
                    block_outputs=block_outputs, tokens=self.norm(x))


class TwoTowerEncoder(PlainEncoder):
    """The two-tower baseline: two separate standard Transformers on the same patches.

    This module's own patch embedding, blocks and norm are the **reconstruction tower** (Point-MAE's
    encoder: patch tokens only; pretraining puts the MAE decoder on them); ``query_tower`` (its own
    patch embedding, blocks and norm) is the **contrastive tower**, the [CLS, IMG, TXT] queries ahead
    of its patches (the query tokens stay here under ReCon's names, so fine-tuning's [CLS], the
    frozen protocols and the reference initialisation find them; ``query_tower`` matches the
    pretraining's ``.query_`` learning-rate rule, as ReCon's query branches do).

    ``tokens`` [B,3+V,2C] puts both streams side by side, row by row: the contrastive tower's row in
    channels 0..C-1, the reconstruction tower's in C..2C-1 (for the three query rows, which that tower
    lacks, its mean patch token). :func:`head_input` / :func:`svm_input` of it are the concatenated
    features of both streams; ``streams`` holds each tower's own output."""

    def __init__(self, cfg: ReConConfig) -> None:
        super().__init__(cfg, queries=True)
        self.query_tower = PlainEncoder(cfg, queries=False)

    def forward(self, neighborhood: Tensor, center: Tensor, visible: Tensor | None = None,
                stop_grad: bool = False) -> dict[str, Tensor | list[Tensor] | dict]:
        rec = self.encode_sequence(neighborhood, center, visible, None)
        con = self.query_tower.encode_sequence(neighborhood, center, visible, self.queries(neighborhood.shape[0]))
        rec_tokens, con_tokens = rec["tokens"], con["tokens"]
        rec_rows = torch.cat([rec_tokens.mean(dim=1, keepdim=True).expand(-1, 3, -1), rec_tokens], dim=1)
        return dict(group_tokens=rec["group_tokens"], patch_pos=rec["patch_pos"],
                    block_outputs=con["block_outputs"], tokens=torch.cat([con_tokens, rec_rows], dim=-1),
                    streams={"reconstruction": rec_tokens, "contrast": con_tokens})


def build_encoder(cfg: ReConConfig) -> nn.Module:
    """The encoder of ``cfg.architecture``: :class:`ReConEncoder`, :class:`PlainEncoder` or :class:`TwoTowerEncoder`."""
    if cfg.architecture == "multitask":
        return PlainEncoder(cfg)
    if cfg.architecture == "two_tower":
        return TwoTowerEncoder(cfg)
    return ReConEncoder(cfg)


@contextmanager
def record_attention(encoder: ReConEncoder) -> Iterator[list[dict[str, list[Tensor]]]]:
    """While active, every block of ``encoder`` keeps the softmax probabilities of its two
    attentions, one detached tensor per forward: ``records[i]["patch"]`` [B,H,V,V] (the patches
    among themselves, ``patch_attn``) and ``records[i]["query"]`` [B,H,3,V] (the CLS/IMG/TXT
    queries over the patches, ``query_attn``). They are computed explicitly beside the unchanged
    outputs (SDPA or not), so the network's numbers are identical; off by default, and outside
    the context nothing is computed or kept. ReCon's encoder only (the baselines have no query branch)."""
    if not isinstance(encoder, ReConEncoder):
        raise ValueError(f"attention recording needs the ReCon encoder, not {type(encoder).__name__}")
    attns = [(block.patch_attn, block.query_attn) for block in encoder.blocks]
    if any(a.record is not None for pair in attns for a in pair):
        raise RuntimeError("record_attention is already active on this encoder")
    records: list[dict[str, list[Tensor]]] = []
    for patch_attn, query_attn in attns:
        records.append({"patch": [], "query": []})
        patch_attn.record, query_attn.record = records[-1]["patch"], records[-1]["query"]
    try:
        yield records
    finally:
        for patch_attn, query_attn in attns:
            patch_attn.record = query_attn.record = None


def split_groups(mask: Tensor, num_mask: int) -> tuple[Tensor, Tensor]:
    """Visible and masked group indices ([B,G-M], [B,M], each ascending, the order boolean
    indexing gives) of a mask [B,G] with num_mask True per row, without a host sync."""
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    split = mask.shape[1] - num_mask
    return order[:, :split], order[:, split:]


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b]] for every b: [B,G,...] with [B,K] -> [B,K,...]."""
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), idx]


def head_input(tokens: Tensor, img_queries: int = 1) -> Tensor:
    """concat[CLS, IMG, TXT, max over patch rows] of normed tokens -> [B,4C]. With K image queries
    (rows 1..K) their max stands for IMG, as ReCon++'s classifier does (``img_token.max(1)``);
    the max over one row is that row, exactly."""
    k = img_queries
    return torch.cat([tokens[:, 0], tokens[:, 1:1 + k].max(dim=1).values, tokens[:, 1 + k],
                      tokens[:, 2 + k:].max(dim=1).values], -1)


def svm_input(tokens: Tensor, img_queries: int = 1) -> Tensor:
    """concat[max over the 2 + K query rows, max + mean over patches] -> [B,2C] (reference SVM feature)."""
    q = 2 + img_queries
    patches = tokens[:, q:]
    return torch.cat([tokens[:, :q].max(dim=1).values,
                      patches.max(dim=1).values + patches.mean(dim=1)], dim=-1)


# ----------------------------------------------------------------------------- pretraining


class ReConDecoder(nn.Module):
    """MAE decoder: pre-norm blocks with positions re-added; LN on the last M rows."""

    def __init__(self, cfg: ReConConfig) -> None:
        super().__init__()
        C = cfg.trans_dim
        self.blocks = nn.ModuleList([
            DecoderBlock(C, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.qkv_bias, dp, cfg.use_sdpa)
            for dp in drop_path_schedule(cfg.drop_path_rate, cfg.decoder_depth)])
        self.norm = nn.LayerNorm(C)

    def forward(self, x: Tensor, pos: Tensor, num_masked: int) -> Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return self.norm(x[:, x.shape[1] - num_masked:])


class ReConPretrain(nn.Module):
    """Pretraining student: encoder, MAE decoder + rebuild head, img/text projections.

    ``cfg.architecture`` ``multitask`` has no decoder (the rebuild head reads the encoder's own
    mask-token rows) and masks its input only when reconstruction is a target; ``two_tower``'s
    decoder reads the reconstruction tower, its projections the contrastive tower's queries.

    ``target_stats`` (a :class:`recon.pretraining.targets.TargetStats`, not part of the state dict, saved beside
    it in checkpoints) is set when the projections were trained against standardised targets;
    :meth:`zero_shot_features` then maps them back into the teachers' spaces."""

    target_stats = None

    def __init__(self, cfg: ReConConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.trans_dim
        self.encoder = build_encoder(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, C))
        if cfg.architecture != "multitask":   # multi-task: no encoder-decoder split
            self.decoder_pos_embed = PositionalMLP(C)
            self.decoder = ReConDecoder(cfg)
        self.rebuild_head = nn.Linear(C, 3 * cfg.group_size)
        # proj_norm "batch": the IMG/TXT queries are one near-constant vector across shapes (per-dimension
        # spread ~0.09 on offsets ~0.8 at init), an ill-conditioned input a linear head barely learns
        # from in a short run; centring and scaling them per dimension first removes that (docs/pretraining.md)
        self.img_norm = nn.BatchNorm1d(C, affine=False) if cfg.proj_norm == "batch" else nn.Identity()
        self.text_norm = nn.BatchNorm1d(C, affine=False) if cfg.proj_norm == "batch" else nn.Identity()
        self.img_proj = nn.Linear(C, cfg.img_feat_dim)
        self.text_proj = nn.Linear(C, cfg.text_feat_dim)
        if "smc" in cfg.targets:
            self.cls_proj = nn.Sequential(nn.Linear(C, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                          nn.Linear(128, 128), nn.BatchNorm1d(128))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Module by module as the reference's ``_init_weights`` functions do: encoder and query tokens
        trunc-normal(0.02); mask token trunc-normal(0.02); decoder blocks xavier-uniform; the
        decoder's positional MLP and the rebuild head PyTorch's default; projections normal(0.02, 0.01)."""
        init_weights(self.encoder)
        for p in (*(getattr(self.encoder, f"{n}_{s}") for n in ReConEncoder.QUERY_NAMES
                    for s in ("token", "pos")), self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)
        if hasattr(self, "decoder"):
            init_pytorch_default(self.decoder_pos_embed)
            init_decoder_weights(self.decoder)
        init_pytorch_default(self.rebuild_head)
        init_projection_weights(self.img_proj)
        init_projection_weights(self.text_proj)
        if hasattr(self, "cls_proj"):
            init_projection_weights(self.cls_proj)

    def random_mask(self, batch: int, device: torch.device | str,
                    generator: torch.Generator | None = None) -> Tensor:
        """Per-sample random mask [B,G] with exactly cfg.num_mask True entries per row."""
        G, M = self.cfg.num_group, self.cfg.num_mask
        noise = torch.rand(batch, G, device=device, generator=generator)
        idx = noise.argsort(dim=1)[:, :M]
        return torch.zeros(batch, G, dtype=torch.bool, device=device).scatter_(1, idx, True)

    @property
    def masks_input(self) -> bool:
        """Whether a pretraining forward masks groups: always, but for a multi-task network without
        the reconstruction target (a plain contrastive Transformer then sees the whole cloud)."""
        return self.cfg.architecture != "multitask" or "rec" in self.cfg.targets

    def _reconstruct(self, patches: Tensor, neighborhood: Tensor, center: Tensor, visible: Tensor,
                     masked: Tensor) -> dict[str, Tensor]:
        """The MAE decoder over the visible ``patches`` [B,V,C] and mask tokens, then the rebuild head."""
        B, M = patches.shape[0], masked.shape[1]
        dec_pos_vis = self.decoder_pos_embed(take_rows(center, visible))
        dec_pos_mask = self.decoder_pos_embed(take_rows(center, masked))
        x = torch.cat([patches, self.mask_token.expand(B, M, -1)], dim=1)
        decoder_out = self.decoder(x, torch.cat([dec_pos_vis, dec_pos_mask], dim=1), M)
        return dict(dec_pos_vis=dec_pos_vis, dec_pos_mask=dec_pos_mask,
                    **self._rebuild(decoder_out, neighborhood, masked))

    def _rebuild(self, rows: Tensor, neighborhood: Tensor, masked: Tensor) -> dict[str, Tensor]:
        """The rebuild head on the masked groups' rows [B,M,C] (the decoder's output, or the multi-task
        encoder's own mask-token rows) and the Chamfer-L2 against the true groups."""
        B, M, S = rows.shape[0], masked.shape[1], neighborhood.shape[2]
        rebuild = self.rebuild_head(rows).reshape(B * M, S, 3)
        gt = take_rows(neighborhood, masked).reshape(B * M, S, 3)
        return dict(decoder_out=rows, rebuild_points=rebuild, gt_points=gt, loss_rec=L.reconstruction_loss(rebuild, gt))

    def forward(self, points: Tensor, img_target: Tensor | None = None,
                text_target: Tensor | None = None, mask: Tensor | None = None,
                labels: Tensor | None = None) -> dict[str, Tensor | list[Tensor] | None]:
        """Pretraining forward.

        points [B,N,3]; img_target [B,Di] (one view per shape) or [B,Vw,Di] (Vw views per shape,
        matched to the K image queries by ``cfg.img_match``, :func:`recon.network.losses.matched_loss`)
        / text_target [B,Dt] teacher features (None: that loss is 0); mask [B,G] bool, True = masked
        (None: random, cfg.num_mask per cloud); labels [B] for the SMC target. Returns a dict:

        - ``loss`` (weighted sum), ``loss_rec``, ``loss_img``, ``loss_text``, ``loss_smc``: scalars
        - ``cls``, ``img``, ``txt``: normed query rows [B,C] (``img`` [B,K,C] when K > 1); ``tokens``: final
          LN [B,Q+V,C], Q = ``cfg.num_queries`` (multitask: [B,3+V+M,C], the mask-token rows last;
          two_tower: [B,3+V,2C], see TwoTowerEncoder)
        - ``img_proj`` [B,Di] ([B,K,Di] when K > 1), ``text_proj`` [B,Dt]: projected IMG / TXT queries
        - ``img_pairs``: (query index [B,P], view index [B,P]) of the matched pairs when the image loss
          went through the matching (views given as [B,Vw,Di], or K > 1), else None
        - ``rebuild_points``, ``gt_points``: [B*M,S,3] (None when reconstruction is off)
        - ``center`` [B,G,3], ``neighborhood`` [B,G,S,3], ``mask`` [B,G]
        - intermediates: ``group_tokens`` [B,G,C] ([B,V,C] with ``embed_masked`` off), ``vis_pos``
          [B,V,C], ``block_outputs`` (list of [B,Q+V,C]), ``dec_pos_vis``, ``dec_pos_mask``, ``decoder_out`` [B,M,C]
        """
        cfg = self.cfg
        neighborhood, center = group_points(points, cfg.num_group, cfg.group_size)
        B = points.shape[0]
        if mask is None and not self.masks_input:
            mask, num_mask = torch.zeros(B, cfg.num_group, dtype=torch.bool, device=points.device), 0
        elif mask is None:
            mask, num_mask = self.random_mask(B, points.device), cfg.num_mask
        else:  # a caller's mask: one host read to learn and check its count
            mask = mask.to(device=points.device, dtype=torch.bool)
            counts = set(mask.sum(1).tolist())
            if len(counts) != 1:
                raise ValueError("every cloud must have the same number of masked groups")
            num_mask = counts.pop()
        visible, masked = split_groups(mask, num_mask)

        if cfg.architecture == "multitask":   # the mask tokens ride in the one Transformer
            enc = self.encoder(neighborhood, center, visible, masked=masked, mask_token=self.mask_token)
        else:
            enc = self.encoder(neighborhood, center, visible, stop_grad=cfg.stop_grad)
        tokens = enc["tokens"]
        img_queries, text_proj = self.project_queries(tokens)
        zero = tokens.new_zeros(())
        C, K = cfg.trans_dim, cfg.img_queries   # C: the query rows' channels (two_tower: the contrastive stream's)
        out: dict = dict(neighborhood=neighborhood, center=center, mask=mask,
                         group_tokens=enc["group_tokens"], vis_pos=enc["patch_pos"],
                         block_outputs=enc["block_outputs"], tokens=tokens,
                         cls=tokens[:, 0, :C], img=tokens[:, 1, :C] if K == 1 else tokens[:, 1:1 + K, :C],
                         txt=tokens[:, 1 + K, :C], img_proj=img_queries[:, 0] if K == 1 else img_queries,
                         text_proj=text_proj, img_pairs=None, rebuild_points=None, gt_points=None,
                         dec_pos_vis=None, dec_pos_mask=None, decoder_out=None,
                         loss_rec=zero, loss_img=zero, loss_text=zero, loss_smc=zero)

        # reconstruction first: its kernels are queued before the matching's one host read below
        if "rec" in cfg.targets and num_mask > 0:
            if cfg.architecture == "multitask":   # a light head on the encoder's mask-token rows, no decoder
                out.update(self._rebuild(tokens[:, tokens.shape[1] - num_mask:], neighborhood, masked))
            else:
                patches = enc["streams"]["reconstruction"] if cfg.architecture == "two_tower" else tokens[:, cfg.num_queries:]
                out.update(self._reconstruct(patches, neighborhood, center, visible, masked))
        if "img" in cfg.targets and img_target is not None:
            if K == 1 and img_target.ndim == 2 and cfg.img_match == "none":   # ReCon: one query, one view
                out["loss_img"] = L.global_loss(out["img_proj"], img_target, cfg.global_loss, cfg.infonce_tau)
            else:   # K queries vs the views given: the mean loss over the matched pairs only
                views = img_target if img_target.ndim == 3 else img_target[:, None]
                out["loss_img"], out["img_pairs"] = L.matched_loss(img_queries, views, cfg.global_loss,
                                                                   cfg.img_match, cfg.infonce_tau)
        if "text" in cfg.targets and text_target is not None:
            out["loss_text"] = L.global_loss(out["text_proj"], text_target, cfg.global_loss, cfg.infonce_tau)
        if "smc" in cfg.targets and labels is not None:
            out["loss_smc"] = L.smc_loss(self.cls_proj(out["cls"]), labels, cfg.smc_tau)

        w = cfg.loss_weights
        out["loss"] = sum(w.get(k, 1.0) * out[f"loss_{k}"] for k in TARGETS)
        return out

    def project_queries(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(img_proj of each IMG query [B,K,Di], text_proj(TXT) [B,Dt]) of final normed tokens
        [B,Q+V,C] (through the projection norms when ``cfg.proj_norm`` is "batch": one BatchNorm over
        the B·K image rows); of two_tower's [B,3+V,2C], the contrastive stream's queries (channels 0..C-1)."""
        C, K = self.cfg.trans_dim, self.cfg.img_queries
        img = self.img_proj(self.img_norm(tokens[:, 1:1 + K, :C].reshape(-1, C))).reshape(tokens.shape[0], K, -1)
        return img, self.text_proj(self.text_norm(tokens[:, 1 + K, :C]))

    def project(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(img_proj(IMG), text_proj(TXT)), each [B,D]: :meth:`project_queries` with the K image
        queries fused into one prediction, their mean (K = 1: the IMG query itself). What zero-shot,
        the monitor and the probes read."""
        img, txt = self.project_queries(tokens)
        return (img[:, 0] if self.cfg.img_queries == 1 else img.mean(dim=1)), txt

    def encode(self, points: Tensor) -> Tensor:
        """Final normed tokens [B,Q+G,cfg.feature_dim] with every group visible."""
        neighborhood, center = group_points(points, self.cfg.num_group, self.cfg.group_size)
        return self.encoder(neighborhood, center, None)["tokens"]

    def features(self, points: Tensor) -> Tensor:
        """Probe features concat[CLS, IMG (max over the K), TXT, max over patches] -> [B,4C] (C: ``cfg.feature_dim``)."""
        return head_input(self.encode(points), self.cfg.img_queries)

    def svm_features(self, points: Tensor) -> Tensor:
        """Reference SVM features concat[max over queries, max+mean over patches] -> [B,2C] (C: ``cfg.feature_dim``)."""
        return svm_input(self.encode(points), self.cfg.img_queries)

    def zero_shot_features(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(img_proj(IMG), text_proj(TXT)) with every group visible, each [B,D], in the teachers'
        spaces (de-normalised when the targets were standardised); K image queries fused by
        :meth:`project` (their mean)."""
        img, txt = self.project(self.encode(points))
        if self.target_stats is not None:
            img = self.target_stats.denormalize("img", img) if self.target_stats.img_mean is not None else img
            txt = self.target_stats.denormalize("text", txt) if self.target_stats.text_mean is not None else txt
        return img, txt


@torch.no_grad()
def recalibrate_batchnorm(model: ReConPretrain, clouds: Tensor, batch: int = 32, projections: bool = True) -> None:
    """Precise BatchNorm: re-estimate the running statistics of the patch embedding's BatchNorm
    layers (two_tower: both towers' embeddings), then (``projections``) of the projection norms
    (``proj_norm: batch``: a full encoder pass with every group visible, as evaluation feeds the
    queries), as the plain average over ``clouds`` [N, n, 3] (train-mode statistics, no gradient, no
    random draw); the weights are untouched.

    Why: the running variances start at 1 and decay by the momentum (0.9 per step), while the
    true variance of the first layer's output is ~1e-4 (trunc-normal(0.02) weights). After the
    few hundred steps of a short run the eval-mode statistics are still dominated by their
    initial value, so eval-mode features (probes, SVM, zero-shot) differ from the train-mode
    ones the losses were fitted with. The reference's ~120k steps make this moot."""
    embeds = [m for m in model.encoder.modules() if isinstance(m, MiniPointNet)]   # two_tower: one per tower
    was_training = model.training
    model.eval()

    def feed(c: Tensor) -> None:
        groups = group_points(c, model.cfg.num_group, model.cfg.group_size)[0]
        for embed in embeds:
            embed(groups)

    average_batchnorm_statistics([m for e in embeds for m in e.modules() if isinstance(m, nn.BatchNorm1d)],
                                 clouds, batch, feed)
    if projections:
        average_batchnorm_statistics([m for m in (model.img_norm, model.text_norm) if isinstance(m, nn.BatchNorm1d)],
                                     clouds, batch, lambda c: model.project(model.encode(c)))
    model.train(was_training)


def average_batchnorm_statistics(layers: list[nn.BatchNorm1d], clouds: Tensor, batch: int, feed) -> None:
    """Reset ``layers``' running statistics to the plain average of their train-mode batch statistics
    while ``feed`` runs on ``clouds`` batch by batch; their momentum and mode are restored."""
    if not layers:
        return
    saved = [(m.momentum, m.training) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None                      # cumulative average over every batch below
        m.train()
    for i in range(0, len(clouds), batch):
        feed(clouds[i:i + batch])
    for m, (momentum, training) in zip(layers, saved):
        m.momentum = momentum
        m.train(training)


# ----------------------------------------------------------------------------- fine-tuning


def build_head(in_dim: int, num_classes: int, kind: str) -> nn.Sequential:
    """``full``/``mlp3``: 3-layer MLP with BN+dropout (indices 0,1,4,5,8); ``linear``."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, num_classes))
    if kind in ("full", "mlp3"):
        return nn.Sequential(
            nn.Linear(in_dim, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(256, num_classes))
    raise ValueError(f"unknown head {kind!r}; choose from full, mlp3, linear")


class ReConClassifier(nn.Module):
    """Fine-tuning classifier: all groups visible, no stop-grad, head on 4C features (the encoder of
    ``cfg.architecture``; two_tower: both streams concatenated, 4 × 2C)."""

    def __init__(self, cfg: ReConConfig, num_classes: int, head: str = "full") -> None:
        super().__init__()
        self.cfg, self.head_kind, self.num_classes = cfg, head, num_classes
        self.encoder = build_encoder(cfg)
        self.head = build_head(4 * cfg.feature_dim, num_classes, head)
        self.backbone_frozen = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """From scratch, as the reference's ``PointTransformer`` (``_init_weights`` over every
        module): Linear/Conv1d trunc-normal(0.02), zero bias, norms 1/0; IMG/TXT tokens and all
        three positions trunc-normal(0.02); the [CLS] token starts at zero."""
        init_weights(self)
        nn.init.zeros_(self.encoder.cls_token)
        for p in (self.encoder.img_token, self.encoder.text_token, self.encoder.cls_pos,
                  self.encoder.img_pos, self.encoder.text_pos):
            nn.init.trunc_normal_(p, std=0.02)

    def reset_head_default(self) -> None:
        """The head as the reference leaves it when the encoder comes from a checkpoint:
        PyTorch's default initialisation (its ``_init_weights`` runs only from scratch)."""
        init_pytorch_default(self.head)

    def forward_tokens(self, points: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """Grouping + encoder outputs (``tokens`` = final LN [B,Q+G,C]) and ``center``/``neighborhood``."""
        neighborhood, center = group_points(points, self.cfg.num_group, self.cfg.group_size)
        out = self.encoder(neighborhood, center, None, stop_grad=False)
        out.update(neighborhood=neighborhood, center=center)
        return out

    def features(self, points: Tensor) -> Tensor:
        return head_input(self.forward_tokens(points)["tokens"], self.cfg.img_queries)

    def forward(self, points: Tensor) -> Tensor:
        """points [B,N,3] -> logits [B,num_classes]."""
        return self.head(self.features(points))

    def trainable_names(self) -> list[str]:
        """Parameters that train under the frozen protocols (MLP-LINEAR / MLP-3)."""
        return [n for n, _ in self.named_parameters()
                if n.startswith("head.") or n in ("encoder.cls_token", "encoder.cls_pos")]

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freeze everything but the head and [CLS] token/position; encoder BN stays in eval."""
        self.backbone_frozen = frozen
        keep = set(self.trainable_names())
        for n, p in self.named_parameters():
            p.requires_grad_(not frozen or n in keep)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ReConClassifier":
        super().train(mode)
        if self.backbone_frozen:
            self.encoder.eval()
        return self
