"""Batched eval-mode inference of a classifier: logits, voting over augmented views, and the
test-set evaluation (single pass, voted, per class)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from recon.downstream.cls_data import ClsData, prepare, vote_views
from recon.downstream.metrics import accuracy, per_class_accuracy
from recon.downstream.recipes import Profile


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@contextmanager
def evaluating(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode (and bf16 autocast on CUDA) for the block, without gradients; the model's
    train/eval state is restored afterwards, whatever happens inside."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_for(device):
            yield
    finally:
        model.train(was_training)


def predict_logits(model: torch.nn.Module, clouds: np.ndarray, batch: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Logits [N, C] of clouds [N, n, 3] in eval mode."""
    device = torch.device(device)
    out = []
    with evaluating(model, device):
        for i in range(0, len(clouds), batch):
            out.append(model(torch.from_numpy(clouds[i:i + batch]).to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def vote_logits(model: torch.nn.Module, superset: np.ndarray, n_points: int, votes: int, kind: str,
                seed: int, batch: int = 64, device: torch.device | str = "cpu") -> np.ndarray:
    """Mean of the logits over ``votes`` augmented passes (``vote_views``)."""
    total = None
    for view in vote_views(superset, n_points, votes, kind, seed):
        logits = predict_logits(model, view, batch, device)
        total = logits if total is None else total + logits
    return total / votes


def evaluate_classifier(model: torch.nn.Module, test: ClsData, recipe: Profile, votes: int, seed: int,
                        batch: int = 64, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Single-pass and voted accuracy, per-class accuracy and predictions on ``test``."""
    superset = prepare(test, recipe, device)
    single = predict_logits(model, np.ascontiguousarray(superset[:, :recipe.n_points]), batch, device)
    pred = single.argmax(1)
    result = {"test_acc": accuracy(pred, test.labels), "test_shapes": len(test)}
    if votes > 0:
        voted = vote_logits(model, superset, recipe.n_points, votes, recipe.vote_augment, seed, batch, device)
        result["test_vote_acc"] = accuracy(voted.argmax(1), test.labels)
        result["votes"] = votes
    per_class = per_class_accuracy(pred, test.labels, test.class_names)
    result["mean_class_acc"] = float(np.mean(list(per_class.values()))) if per_class else math.nan
    result["per_class_acc"] = per_class
    return result | {"_pred": pred}
