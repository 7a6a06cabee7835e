"""Mean attention distance per encoder block (ReCon, Fig. 1(b)): do the blocks attend locally
(reconstruction-style) or globally (contrastive-style)?

Positions are the group centres of the grouping the encoder sees (FPS centres, in the coordinates
of the normalised cloud: unit sphere by default). The softmax probabilities come from
:func:`recon.network.model.record_attention` with every group visible, in eval mode.

- Patch tokens (``patch_attn``, the patches among themselves): ViT's mean attention distance. For
  each query patch i and head, ``sum_j p_ij ||c_i - c_j||``; averaged over the query patches, then
  over the shapes (per head), then over the heads (per block).
- Global queries (``query_attn``: CLS, IMG, TXT attending to the patches): a query has no position,
  so ViT's definition has nothing to measure from. We place the query where it looks: its
  distance is the expected distance between two patch centres drawn independently from its own
  attention, ``sum_jk p_j p_k ||c_j - c_k||`` (= ViT's distance for a query sitting at a patch
  drawn from its attention). It is 0 when a query reads one patch, small when it reads one
  region, and for uniform attention it equals what the patch tokens give under uniform
  attention (the mean pairwise centre distance, self pairs included): the two panels share one
  scale and one reference line (``uniform``). A distance to a fixed point such as the cloud's
  centroid would instead measure *where* the query reads (centre or rim), not how spread out
  its reading is.

Averaged per head, then per query (cls / img / text) and per block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recon.network.model import ReConEncoder, record_attention
from recon.network.pointops import group_points
from recon.pretraining.probes import batched

QUERY_DISTANCE = ("expected distance between two patch centres drawn independently from the query's attention, "
                  "sum_jk p_j p_k ||c_j - c_k|| (0: one patch; uniform attention: the mean pairwise centre distance)")
PATCH_DISTANCE = "ViT's mean attention distance, sum_j p_ij ||c_i - c_j||, averaged over query patches i"


def pairwise_distances(centres: Tensor) -> Tensor:
    """||c_i - c_j|| [..., G, G] of centres [..., G, 3], in float64 (exact zeros on the diagonal)."""
    c = centres.double()
    return (c.unsqueeze(-2) - c.unsqueeze(-3)).norm(dim=-1)


def patch_attention_distance(probs: Tensor, centres: Tensor) -> Tensor:
    """ViT's mean attention distance of self-attention probabilities ``probs`` [B,H,G,G] (rows: query
    patches) over centres [B,G,3]: ``mean_i sum_j p_ij ||c_i - c_j||`` -> [B,H]."""
    dist = pairwise_distances(centres).unsqueeze(-3)                     # [B,1,G,G]
    return (probs.double() * dist).sum(-1).mean(-1)


def query_attention_spread(probs: Tensor, centres: Tensor) -> Tensor:
    """Distance of position-less queries with probabilities ``probs`` [B,H,Q,G] over the patch
    centres [B,G,3]: ``sum_jk p_j p_k ||c_j - c_k||`` per query -> [B,H,Q] (module docstring)."""
    p = probs.double()
    return torch.einsum("bhqj,bjk,bhqk->bhq", p, pairwise_distances(centres), p)


@torch.no_grad()
def shape_distances(encoder: ReConEncoder, points: Tensor, num_group: int, group_size: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Per shape of a batch [B,N,3]: patch distances [B,L,H], query distances [B,L,H,Q] (Q query rows) and the
    uniform-attention reference (mean pairwise centre distance) [B]."""
    neighborhood, center = group_points(points, num_group, group_size)
    with record_attention(encoder) as records:
        encoder(neighborhood, center, None)
    patch = torch.stack([patch_attention_distance(r["patch"][0], center) for r in records], 1)
    query = torch.stack([query_attention_spread(r["query"][0], center) for r in records], 1)
    return patch, query, pairwise_distances(center).mean((-2, -1))


def attention_distances(model: torch.nn.Module, clouds: np.ndarray, batch: int = 32,
                        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Mean attention distance of every block of ``model``'s encoder (a ReConPretrain or a
    ReConClassifier: ``.encoder`` and ``.cfg``) over ``clouds`` [S,N,3] (the evaluation inputs):

    ``{"patches": {"per_block": [L], "per_head": [L][H]}, "queries": {"per_block", "per_head",
    "per_query": {"cls": [L], "img": [L], "text": [L]}}, "uniform": float, "shapes", "blocks",
    "heads", "num_group", "definition"}`` (means over shapes; see the module docstring)."""
    cfg = model.cfg
    was_training = model.training
    model.eval().to(device)
    try:
        patch, query, uniform = batched(
            lambda x: shape_distances(model.encoder, x, cfg.num_group, cfg.group_size), clouds, batch, device)
    finally:
        model.train(was_training)
    patch_head = patch.astype(np.float64).mean(0)                   # [L,H]
    query_all = query.astype(np.float64).mean(0)                    # [L,H,Q]
    k = cfg.img_queries   # rows [CLS, IMG_1..IMG_K, TXT]: "img" is the mean over the K image queries
    rows = dict(zip(ReConEncoder.QUERY_NAMES, (slice(0, 1), slice(1, 1 + k), slice(1 + k, 2 + k))))
    return {
        "patches": {"per_block": patch_head.mean(1).tolist(), "per_head": patch_head.tolist()},
        "queries": {"per_block": query_all.mean((1, 2)).tolist(), "per_head": query_all.mean(2).tolist(),
                    "per_query": {n: query_all[:, :, r].mean((1, 2)).tolist() for n, r in rows.items()}},
        "uniform": float(uniform.astype(np.float64).mean()),
        "shapes": int(len(clouds)), "blocks": int(patch_head.shape[0]), "heads": int(patch_head.shape[1]),
        "num_group": int(cfg.num_group),
        "definition": {"patches": PATCH_DISTANCE, "queries": QUERY_DISTANCE},
    }


def plot_distances(results: dict[str, dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Distance vs block, one line per checkpoint (``results``: name -> :func:`attention_distances`),
    its heads as dots, its uniform-attention reference dotted; patch tokens left, queries right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = (("patches", "patch tokens (patch → patch)"), ("queries", "queries (CLS/IMG/TXT → patches)"))
    for ax, (key, panel_title) in zip(axes, panels):
        for i, (name, r) in enumerate(results.items()):
            color = f"C{i % 10}"
            blocks = np.arange(1, r["blocks"] + 1)
            heads = np.asarray(r[key]["per_head"])
            ax.plot(blocks, r[key]["per_block"], marker="o", color=color, label=name)
            ax.scatter(np.repeat(blocks, heads.shape[1]), heads.ravel(), s=10, color=color, alpha=0.35)
            ax.axhline(r["uniform"], color=color, linestyle=":", linewidth=1)
        ax.set_title(panel_title)
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
        ax.set_xticks(np.arange(1, max((r["blocks"] for r in results.values()), default=1) + 1))
    axes[0].set_ylabel("mean attention distance")
    axes[0].legend(fontsize=8, title="line: mean of heads (dots); dotted: uniform attention", title_fontsize=7)
    fig.suptitle(title or "mean attention distance per block")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
