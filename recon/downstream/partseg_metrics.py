"""Part-segmentation scores as the reference's ``segmentation/main.py`` ``validate`` computes them.

- A shape's prediction is the argmax over *its category's* parts only (the category is given, as
  in the reference's test loop), so it can never name another category's part.
- A shape's IoU is the mean over its category's parts of |pred ∩ true| / |pred ∪ true|; a part
  absent from both the prediction and the truth counts 1.0.
- Instance mIoU: mean over shapes. Class mIoU: mean over categories of their shapes' mean.

Figures are in percent (fraction × 100), as the classification accuracy of ``recon.downstream.finetune``.
The reference reports fractions, and its class mIoU averages all 16 categories (NaN when one has
no test shape); here it averages the categories present, which is the same on ShapeNetPart's test
split (every category has test shapes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def category_mask(category_parts: Sequence[Sequence[int]], num_parts: int) -> np.ndarray:
    """bool [categories, num_parts]: which global part ids belong to each category."""
    mask = np.zeros((len(category_parts), num_parts), dtype=bool)
    for c, parts in enumerate(category_parts):
        mask[c, list(parts)] = True
    return mask


def restrict_to_category(logits: np.ndarray | torch.Tensor, category: np.ndarray | torch.Tensor,
                         category_parts: Sequence[Sequence[int]]) -> np.ndarray | torch.Tensor:
    """Global part ids [N, P]: the argmax of ``logits`` [N, P, num_parts] over the parts of each
    shape's ``category`` [N] only. Ties go to the lowest part id, as the reference's
    ``argmax(logits[:, parts]) + parts[0]``. A tensor in gives an int64 tensor on its device,
    an array in an int64 array."""
    mask = category_mask(category_parts, logits.shape[-1])
    if isinstance(logits, torch.Tensor):
        keep = torch.as_tensor(mask, device=logits.device)[torch.as_tensor(category, device=logits.device).long()]
        return logits.masked_fill(~keep[:, None, :], -math.inf).argmax(-1)
    keep = mask[np.asarray(category, dtype=np.int64)]
    return np.where(keep[:, None, :], np.asarray(logits), -np.inf).argmax(-1).astype(np.int64)


def shape_ious(pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
               category: np.ndarray | torch.Tensor, category_parts: Sequence[Sequence[int]]) -> np.ndarray:
    """float64 [N]: per shape, the mean over its category's parts of the part IoU (pred and
    labels: global part ids [N, P]); a part neither predicted nor present counts 1.0."""
    pred, labels, category = _numpy(pred), _numpy(labels), _numpy(category).astype(np.int64)
    ious = np.zeros(len(category), dtype=np.float64)
    for c in np.unique(category):
        rows = np.flatnonzero(category == c)
        p, t = pred[rows], labels[rows]
        per_part = []
        for part in category_parts[c]:
            inter = ((p == part) & (t == part)).sum(1)
            union = ((p == part) | (t == part)).sum(1)
            per_part.append(np.where(union == 0, 1.0, inter / np.maximum(union, 1)))
        ious[rows] = np.mean(per_part, axis=0)
    return ious


def miou_summary(ious: np.ndarray, category: np.ndarray | torch.Tensor, class_names: Sequence[str]) -> dict:
    """``instance_miou`` (mean over shapes), ``class_miou`` (mean over the categories present of
    their shapes' mean), ``per_category`` {name: mIoU} (categories present, in class order), all
    in percent, and ``shapes``. NaN figures when there is no shape."""
    ious, category = np.asarray(ious, dtype=np.float64), _numpy(category).astype(np.int64)
    per_category = {class_names[c]: float(ious[category == c].mean() * 100) for c in np.unique(category)}
    return {"instance_miou": float(ious.mean() * 100) if len(ious) else math.nan,
            "class_miou": float(np.mean(list(per_category.values()))) if per_category else math.nan,
            "per_category": per_category,
            "shapes": int(len(ious))}


def part_colours(parts: np.ndarray) -> np.ndarray:
    """RGBA [..., 4] per global part id (tab10, cycled): the parts of one category, at most 10
    consecutive ids (6 in ShapeNetPart), never share a colour."""
    import matplotlib

    return matplotlib.colormaps["tab10"](np.asarray(parts) % 10)


def plot_parts(points: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor,
               labels: np.ndarray | torch.Tensor, names: Sequence[str], path: str | Path,
               max_shapes: int = 4, dpi: int = 100) -> Path:
    """A PNG of the first ``max_shapes`` shapes, one row each: predicted parts (left) beside the
    true parts (right), one colour per part id. 800 × 400·rows pixels at the default dpi;
    written to a temporary file, then renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, pred, labels = _numpy(points), _numpy(pred), _numpy(labels)
    rows = min(len(points), max_shapes)
    if rows == 0:
        raise ValueError("plot_parts: no shape to draw")
    fig = plt.figure(figsize=(8, 4 * rows), dpi=dpi)
    for r in range(rows):
        xyz = points[r]
        for col, (parts, what) in enumerate(((pred[r], "predicted"), (labels[r], "true"))):
            ax = fig.add_subplot(rows, 2, 2 * r + col + 1, projection="3d")
            ax.scatter(xyz[:, 0], xyz[:, 2], xyz[:, 1], c=part_colours(parts), s=4, linewidths=0,
                       depthshade=False)  # y up; depthshade would lighten the part colours
            ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
            ax.set_box_aspect((1, 1, 1), zoom=1.4)
            ax.set_axis_off()
            ax.set_title(f"{names[r]}: {what}", fontsize=9)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.95, wspace=0, hspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
