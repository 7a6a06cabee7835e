"""ReCon losses: Chamfer-L2 reconstruction, global distillation losses, SMC on [CLS]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from recon.network.pointops import chamfer_l2

GLOBAL_LOSSES = ("smooth_l1", "l2", "cosine", "infonce")


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
