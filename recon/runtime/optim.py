"""Optimiser parameter groups and the warm-up + cosine learning-rate schedules.

The reference recipe: AdamW, weight decay 0.05 except on biases, 1-D parameters and tokens; the
learning rate warms up linearly from 1e-6 and then follows a cosine down to a floor of 1e-6.
Two granularities: ``epoch`` (the reference: timm's ``CosineLRScheduler`` with ``t_in_epochs=True``,
one learning rate per epoch) and ``step`` (a smooth per-step version of the same shape, for short
runs such as the demo whose few epochs would otherwise be spent mostly in warm-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def no_decay(name: str, param: torch.Tensor) -> bool:
    """The reference rule: 1-D tensors, biases and tokens get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or "token" in name


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 boosted: tuple[str, ...] = (), boost: float = 10.0) -> list[dict]:
    """AdamW groups over ``model``'s trainable parameters (frozen ones are left out), split two ways:
    weight decay (``weight_decay``, or 0 where :func:`no_decay` says so) and learning rate (``boost`` ×
    ``lr`` for a parameter whose name contains any of the fragments in ``boosted``, else ``lr``).
    Each group keeps its multiplier as ``lr_scale``, which :func:`set_lr` applies whenever the
    schedule sets a new base rate.

    The callers: pretraining (recon/pretraining/trainer.py) boosts ``QUERY_SIDE`` by
    ``query_lr_scale`` when that is not 1 (the distillation side: the query tokens and their
    positions, every block's query branch, the IMG/TXT projections); fine-tuning
    (recon/downstream/finetune.py) boosts its task's names by ``head_lr_scale`` (classification:
    ``BOOSTED``, the head and the [CLS] token/position; part segmentation: the reference's conv
    layers outside the encoder, ``ReConPartSeg.lr_boost_names``)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (any(b in name for b in boosted), no_decay(name, param))
        groups.setdefault(key, []).append(param)
    return [{"params": params, "weight_decay": 0.0 if nd else weight_decay,
             "lr_scale": boost if is_boosted else 1.0, "lr": lr * (boost if is_boosted else 1.0)}
            for (is_boosted, nd), params in sorted(groups.items())]


def adamw(model: nn.Module, weight_decay: float, lr: float, boosted: tuple[str, ...] = (),
          boost: float = 10.0) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, betas (0.9, 0.999). The fused kernel (one pass over all
    parameters) is ~5x faster than the default on CPU for the base model (bench/README.md)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, lr, boosted, boost), lr=lr,
                             betas=(0.9, 0.999), fused=True)


def lr_at(step: float, total_steps: int, warmup_steps: int, base_lr: float,
          min_lr: float = 1e-6, warmup_lr: float = 1e-6) -> float:
    """Linear warm-up from ``warmup_lr`` to ``base_lr``, then cosine down to ``min_lr``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / max(warmup_steps, 1)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_per_epoch(epoch: int, epochs: int, warmup_epochs: int, base_lr: float,
                 min_lr: float = 1e-6, warmup_lr: float = 1e-6) -> float:
    """The learning rate of ``epoch`` under the reference schedule: timm's
    ``CosineLRScheduler(t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_lr, cycle_limit=1, t_in_epochs=True)`` driven as the reference runner
    drives it: set to ``warmup_lr`` at construction, then ``step(epoch)`` at the *end* of each
    epoch, so epoch ``e`` trains at the scheduler's value for ``e - 1``. The cosine is a function
    of the absolute epoch over ``epochs`` (timm's default ``warmup_prefix=False``)."""
    t = epoch - 1
    if t < 0:
        return warmup_lr if warmup_epochs > 0 else base_lr
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


SCHEDULES = ("epoch", "step")


@dataclass(frozen=True)
class Schedule:
    """Warm-up + cosine at ``kind`` granularity (``epoch``: :func:`lr_per_epoch`, the reference;
    ``step``: :func:`lr_at` over optimiser steps)."""

    kind: str
    epochs: int
    warmup_epochs: int
    steps_per_epoch: int
    base_lr: float
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose from {SCHEDULES}")

    def lr(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based, counted over the whole run)."""
        if self.kind == "epoch":
            return lr_per_epoch(step // self.steps_per_epoch, self.epochs, self.warmup_epochs,
                                self.base_lr, self.min_lr, self.warmup_lr)
        return lr_at(step, self.epochs * self.steps_per_epoch, self.warmup_epochs * self.steps_per_epoch,
                     self.base_lr, self.min_lr, self.warmup_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
