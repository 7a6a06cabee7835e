"""ReCon losses: Chamfer-L2 reconstruction, global distillation losses (and ReCon++'s matching of
K image queries to V views), SMC on [CLS]."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recon.network.pointops import chamfer_l2

GLOBAL_LOSSES = ("smooth_l1", "l2", "cosine", "infonce")
#: how K image queries meet V views: none (query k <-> view k, K == V) | hungarian (per shape, min total loss)
MATCHES = ("none", "hungarian")


def reconstruction_loss(rebuild_points: Tensor, gt_points: Tensor) -> Tensor:
    """Chamfer-L2 between predicted and true masked groups ([K,S,3] each)."""
    return chamfer_l2(rebuild_points, gt_points)


def smooth_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """SmoothL1, beta 1, mean over batch and features (the reference default)."""
    return F.smooth_l1_loss(pred, target, beta=1.0, reduction="mean")


def l2_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over batch and features."""
    return F.mse_loss(pred, target, reduction="mean")


def cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - cosine similarity, averaged over the batch."""
    return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()


def infonce_loss(pred: Tensor, target: Tensor, tau: float = 0.1) -> Tensor:
    """InfoNCE with in-batch negatives: row i of pred must pick row i of target.

    Both sides are L2-normalised; logits = pred @ target.T / tau; cross-entropy on the
    diagonal (student -> teacher direction only; the teacher is frozen).
    """
    p = F.normalize(pred, dim=-1)
    t = F.normalize(target, dim=-1)
    logits = p @ t.t() / tau
    labels = torch.arange(p.shape[0], device=p.device)
    return F.cross_entropy(logits, labels)


def global_loss(pred: Tensor, target: Tensor, kind: str = "smooth_l1", tau: float = 0.1) -> Tensor:
    """Distillation loss between projected query ``pred`` and teacher feature ``target``.

    Computed in float32 at least (also under bf16/fp16 autocast).
    """
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    if kind == "smooth_l1":
        return smooth_l1_loss(pred, target)
    if kind == "l2":
        return l2_loss(pred, target)
    if kind == "cosine":
        return cosine_loss(pred, target)
    if kind == "infonce":
        return infonce_loss(pred, target, tau)
    raise ValueError(f"unknown global loss {kind!r}; choose from {GLOBAL_LOSSES}")


@torch.no_grad()
def pair_losses(pred: Tensor, target: Tensor, kind: str = "smooth_l1") -> Tensor:
    """[B,K,V] detached: the loss :func:`global_loss` gives each (query k, view v) pair of one shape
    on its own, pred [B,K,D] against target [B,V,D] (smooth_l1 / l2: mean over the features;
    cosine: 1 - cosine similarity). In float32 at least. InfoNCE has no per-pair value."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    p, t = pred.to(dtype), target.to(dtype)
    if kind == "cosine":
        return 1.0 - F.normalize(p, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)
    diff = p[:, :, None] - t[:, None]                                     # [B,K,V,D]
    if kind == "smooth_l1":   # beta 1
        a = diff.abs()
        return torch.where(a < 1.0, 0.5 * a * a, a - 0.5).mean(-1)
    if kind == "l2":
        return diff.square().mean(-1)
    raise ValueError(f"no per-pair loss for {kind!r}; matching needs one of smooth_l1, l2, cosine")


@torch.compiler.disable
def hungarian_pairs(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Per shape, the one-to-one (query, view) pairs of least total cost in ``cost`` [B,K,V]
    (``scipy.optimize.linear_sum_assignment``): min(K, V) pairs each, in query order, as (query
    index [B,P], view index [B,P]) on ``cost``'s device.

    The one host transfer of a step: the small matrix (B·K·V floats: 74 KB at 128 × 12 × 12) goes
    to the CPU, which waits for the forward up to the projections; the reconstruction branch is
    queued before it (:meth:`recon.network.model.ReConPretrain.forward`), so the GPU has that work
    while the CPU solves the B small assignments; the indices go back with one copy. Not capturable
    in a CUDA graph; torch.compile runs it eagerly. Non-finite costs are replaced by huge finite ones
    so a matching is always found and the non-finite loss itself reaches the trainer's guard."""
    from scipy.optimize import linear_sum_assignment

    c = np.nan_to_num(cost.detach().float().cpu().numpy(), nan=1e30, posinf=1e30, neginf=-1e30)
    pairs = np.stack([np.stack(linear_sum_assignment(m)) for m in c])   # [B,2,P]
    idx = torch.from_numpy(pairs).to(cost.device)
    return idx[:, 0], idx[:, 1]


def matched_loss(pred: Tensor, target: Tensor, kind: str = "smooth_l1", match: str = "hungarian",
                 tau: float = 0.1) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """ReCon++'s image distillation: K predictions pred [B,K,D] of each shape against its V teacher
    views target [B,V,D]. ``match`` pairs them per shape: ``none`` query k with view k (K == V);
    ``hungarian`` the min(K, V) pairs of least total loss (:func:`hungarian_pairs` on the detached
    :func:`pair_losses`). The loss is :func:`global_loss` over the matched pairs stacked, i.e. the
    mean of their per-pair losses: gradients reach the matched pairs only. Returns (loss, (query
    index [B,P], view index [B,P])). With K = V = 1 it is ``global_loss(pred[:, 0], target[:, 0])``,
    bit for bit."""
    B, K, V = pred.shape[0], pred.shape[1], target.shape[1]
    if match == "none":
        if K != V:
            raise ValueError(f"img_match none pairs query k with view k: it needs as many queries as views, "
                             f"not K={K}, V={V} (use img_match hungarian)")
        rows = cols = torch.arange(K, device=pred.device).expand(B, K)
    elif match == "hungarian":
        rows, cols = hungarian_pairs(pair_losses(pred, target, kind))
    else:
        raise ValueError(f"unknown match {match!r}; choose from {MATCHES}")
    b = torch.arange(B, device=pred.device)[:, None]
    return global_loss(pred[b, rows].flatten(0, 1), target[b, cols].flatten(0, 1), kind, tau), (rows, cols)


def smc_loss(cls_features: Tensor, labels: Tensor, tau: float = 0.1) -> Tensor:
    """Supervised contrastive loss on [CLS] features (SupCon form, in-batch).

    For every anchor with at least one same-label partner: minus the mean, over its
    positives, of log softmax(sim / tau) taken over all other samples. Anchors without a
    positive are skipped; returns 0 (with grad) when no anchor has one.
    """
    z = F.normalize(cls_features, dim=-1)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / tau).masked_fill(eye, float("-inf"))
    log_prob = logits.log_softmax(dim=1).masked_fill(eye, 0.0)
    labels = labels.reshape(-1)
    pos = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~eye
    n_pos = pos.sum(1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return z.sum() * 0.0
    per_anchor = -(log_prob * pos).sum(1)[has_pos] / n_pos[has_pos]
    return per_anchor.mean()
