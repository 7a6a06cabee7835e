"""Teacher-target normalisation: per-dimension mean/std of the cached targets over the train split.

The reference regresses raw teacher features (``target_norm: none``). Raw targets are badly
scaled for a few-thousand-step run: efficientnet features have per-dimension std ≈ 0.26 around
offsets up to 1.6, MiniLM text features are unit-norm with per-dimension std ≈ 0.04 (a SmoothL1
text loss ~70× smaller than the image loss), so the student mostly learns the mean target.
``target_norm: store`` standardises every target dimension with statistics computed once from the
train split of the cached stores (cheap because the targets are cached); the statistics travel
with the model so that zero-shot and any comparison in teacher space undo them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

TARGET_NORMS = ("none", "store")
#: a dimension's std is floored at this fraction of the mean std (a constant dimension, e.g. a
#: dead ReLU channel of the teacher, must not blow up held-out values)
STD_FLOOR = 1e-3


@dataclass
class TargetStats:
    """Per-dimension mean and std (float32 [D]) of the image and text targets (None: not used)."""

    img_mean: np.ndarray | None = None
    img_std: np.ndarray | None = None
    text_mean: np.ndarray | None = None
    text_std: np.ndarray | None = None

    def normalize(self, kind: str, x: Tensor) -> Tensor:
        """(x - mean) / std for ``kind`` 'img' or 'text'."""
        mean, std = self._pair(kind, x)
        return (x - mean) / std

    def denormalize(self, kind: str, x: Tensor) -> Tensor:
        """x * std + mean: a prediction in normalised space back in the teacher's space."""
        mean, std = self._pair(kind, x)
        return x * std + mean

    def _pair(self, kind: str, like: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = getattr(self, f"{kind}_mean"), getattr(self, f"{kind}_std")
        if mean is None:
            raise ValueError(f"no {kind} target statistics")
        as_tensor = lambda a: torch.as_tensor(a, dtype=like.dtype, device=like.device)  # noqa: E731
        return as_tensor(mean), as_tensor(std)

    def state(self) -> dict[str, Tensor]:
        """Tensors for a checkpoint (loadable with ``weights_only=True``)."""
        return {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_state(cls, state: dict | None) -> "TargetStats | None":
        if not state:
            return None
        return cls(**{k: np.asarray(v.cpu() if isinstance(v, Tensor) else v, np.float32) for k, v in state.items()})

    def summary(self) -> dict[str, float]:
        """A few numbers for metrics.json (the full vectors live in the checkpoint)."""
        out = {}
        for kind in ("img", "text"):
            mean, std = getattr(self, f"{kind}_mean"), getattr(self, f"{kind}_std")
            if mean is not None:
                out.update({f"{kind}_dim": int(mean.size), f"{kind}_mean_abs_max": float(np.abs(mean).max()),
                            f"{kind}_std_mean": float(std.mean()), f"{kind}_std_min": float(std.min())})
        return out


def _mean_std(total: np.ndarray, squares: np.ndarray, count: float) -> tuple[np.ndarray, np.ndarray]:
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    std = np.maximum(std, STD_FLOOR * std.mean())
    return mean.astype(np.float32), std.astype(np.float32)


def compute_target_stats(image, text, category_index: np.ndarray, rows: np.ndarray,
                         variants: slice = slice(None), chunk: int = 1024) -> TargetStats:
    """Statistics over ``rows`` (the train split): the image targets [N, V, A, D] of those rows
    (every view, the variants in ``variants``), streamed ``chunk`` rows at a time in float64; the
    text targets [C, T, D] of their categories, each weighted by its number of rows (the
    distribution the trainer draws from)."""
    stats = TargetStats()
    rows = np.sort(np.asarray(rows))
    if len(rows) == 0:
        raise ValueError("target statistics need at least one train shape")
    if image is not None:
        dim = image.shape[-1]
        total, squares, count = np.zeros(dim), np.zeros(dim), 0
        for i in range(0, len(rows), chunk):
            block = np.asarray(image[rows[i:i + chunk]])[:, :, variants].reshape(-1, dim).astype(np.float64)
            total += block.sum(0)
            squares += (block ** 2).sum(0)
            count += len(block)
        stats.img_mean, stats.img_std = _mean_std(total, squares, count)
    if text is not None:
        weights = np.bincount(category_index[rows], minlength=len(text)).astype(np.float64)
        feats = np.asarray(text, dtype=np.float64)                          # [C, T, D]
        count = weights.sum() * feats.shape[1]
        total = np.einsum("c,ctd->d", weights, feats)
        squares = np.einsum("c,ctd->d", weights, feats ** 2)
        stats.text_mean, stats.text_std = _mean_std(total, squares, count)
    return stats
