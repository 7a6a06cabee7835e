"""Optimiser parameter groups and the warm-up + cosine learning-rate schedule (per SPEC)."""

from __future__ import annotations

import math

import torch
from torch import nn


def no_decay(name: str, param: torch.Tensor) -> bool:
    """The reference rule: 1-D tensors, biases and tokens get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or "token" in name


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 boosted: tuple[str, ...] = (), boost: float = 10.0) -> list[dict]:
    """AdamW groups: decay / no decay, and ``boost``× lr for names containing any of ``boosted``
    (the fine-tuning head and [CLS])."""
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
