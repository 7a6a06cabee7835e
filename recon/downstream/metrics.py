"""Classification metrics and their pictures: confusion matrix, accuracy, per-class accuracy,
the confusion plot dvc shows, and the mean ± std summary of a seeds sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = actual class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Accuracy (%) of every class present in ``labels``."""
    return {class_names[c]: float((pred[labels == c] == c).mean() * 100)
            for c in range(len(class_names)) if (labels == c).any()}


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean() * 100) if len(labels) else math.nan


def write_confusion(out: Path, pred: np.ndarray, labels: np.ndarray, class_names: list[str],
                    title: str = "") -> None:
    """``confusion.csv`` (one ``actual,predicted`` row per shape: the input of dvc's confusion
    template) and ``confusion.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = ["actual,predicted"] + [f"{class_names[a]},{class_names[b]}" for a, b in zip(labels, pred)]
    tmp = out / "confusion.csv.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "confusion.csv")
    cm = confusion_matrix(pred, labels, len(class_names))
    k = len(class_names)
    side = min(max(4.5, 2 + 0.3 * k), 16)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=6 if k > 20 else 8)
    ax.set_yticks(range(k), class_names, fontsize=6 if k > 20 else 8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if k <= 20:
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > cm.max() / 2 else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)


#: the figures a seeds sweep summarises, per task
SEED_FIGURES = {"classification": ("test_acc", "test_vote_acc", "mean_class_acc", "val_acc"),
                "partseg": ("test_instance_miou", "test_class_miou")}
PER_CLASS_FIGURES = ("per_class_acc", "per_category_miou")   # left out of the per-seed list


def summarise_seeds(per_seed: list[dict], task: str = "classification") -> dict[str, Any]:
    """mean ± std (ddof 0) of the task's test figures over seeds, with every seed's numbers."""
    summary: dict[str, Any] = {"seeds": [m["seed"] for m in per_seed]}
    for key in SEED_FIGURES[task]:
        values = [m[key] for m in per_seed if key in m]
        if values:
            summary[f"{key}_mean"] = float(np.mean(values))
            summary[f"{key}_std"] = float(np.std(values))
    summary["per_seed"] = [{k: v for k, v in m.items() if k not in PER_CLASS_FIGURES} for m in per_seed]
    return summary
