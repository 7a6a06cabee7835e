"""Stage `pretrain`: train the ReCon student on points + cached teacher targets.

Outputs (``cache/pretrain/``): ``checkpoints/epoch-NNNN.pt`` (the last k), ``model.pt`` (final
weights + config), ``history.csv`` (per-epoch losses, lr, samples/s; rewritten every epoch). Git-tracked
results (``cache/metrics/pretrain/``): ``history.csv`` of the finished run and ``metrics.json``
(final losses, the loss a constant mean-target predictor would get for each teacher, and the k-NN
probe accuracy of pretrained vs randomly initialised features on the test split).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from recon.data import fixed_subset
from recon import trainstate
from recon.evaluate import batched, knn_probe
from recon.losses import global_loss
from recon.pretrain import PretrainParams, train
from stages.common import cache_dir, console, load_params, metrics_dir


class LossBar:
    """A rich progress bar for one epoch showing the running loss terms."""

    def __init__(self, title: str, total: int):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[losses]}"), TimeRemainingColumn(), console=console)
        self.progress.start()
        self.task = self.progress.add_task(title, total=total, losses="")

    def update(self, **losses: float) -> None:
        self.progress.update(self.task, advance=1,
                             losses=" ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    def close(self) -> None:
        self.progress.stop()


def probe(model, stores, n_points: int, device, seed: int) -> dict[str, float]:
    """k-NN (k=5, cosine) accuracy on the test split from train-split features: pretrained vs
    the same architecture at random init, on the whole probe feature and on each of its parts.
    Reported, not asserted on."""
    split = stores.shapes["split"].to_numpy()
    usable = np.zeros(len(split), dtype=bool)
    usable[stores.rows] = True
    train_rows = np.flatnonzero(usable & (split == "train"))
    test_rows = np.flatnonzero(usable & (split == "test"))
    if len(train_rows) == 0 or len(test_rows) == 0:
        return {}
    clouds = {name: np.stack([fixed_subset(stores.points[r], n_points, seed) for r in rows])
              for name, rows in (("train", train_rows), ("test", test_rows))}
    labels = {name: stores.category_index[rows] for name, rows in (("train", train_rows), ("test", test_rows))}
    torch.manual_seed(seed)
    random_model = type(model)(model.cfg).to(device)
    result = {}
    width = model.cfg.trans_dim
    for tag, net in (("pretrained", model), ("random_init", random_model)):
        net.eval()
        feats = {name: batched(net.features, clouds[name], 64, device)[0] for name in clouds}
        result[f"knn5_test_acc_{tag}"] = knn_probe(feats["train"], labels["train"], feats["test"], labels["test"])
        # the same probe on each part of concat[CLS, IMG, TXT, max-pooled patches]: which part learned
        result[f"knn5_test_acc_{tag}_by_part"] = {
            part: knn_probe(feats["train"][:, k * width:(k + 1) * width], labels["train"],
                            feats["test"][:, k * width:(k + 1) * width], labels["test"])
            for k, part in enumerate(("cls", "img", "txt", "pooled"))}
    result["test_shapes"] = int(len(test_rows))
    return result


def constant_baselines(stores, kind: str = "smooth_l1", chunk: int | None = None,
                       block_bytes: int = 64 << 20) -> dict[str, float]:
    """The image/text loss of always predicting the mean target (over the usable shapes, every
    view/variant and template as the dataset draws them), with the training loss itself
    (:func:`recon.losses.global_loss`). A training loss at this level means the student learned
    nothing shape-specific from that teacher. Only for smooth_l1 and l2 (a mean is their best
    constant).

    Image targets are streamed in float32 blocks of ``chunk`` rows (default: ~``block_bytes``),
    two passes over a possibly memory-mapped store, with float64 sums: memory stays bounded by the
    block whatever the number of shapes, views and variants."""
    if kind not in ("smooth_l1", "l2"):
        return {}
    result = {}
    rows = np.asarray(stores.rows)
    if stores.image is not None and len(rows):
        dim = stores.image.shape[-1]
        per_row = int(np.prod(stores.image.shape[1:]))
        step = chunk or max(1, block_bytes // (per_row * 4))

        def blocks():  # float32 [k, D] targets, a block of rows at a time
            for i in range(0, len(rows), step):
                yield torch.from_numpy(np.asarray(stores.image[rows[i:i + step]], dtype=np.float32).reshape(-1, dim))

        count = len(rows) * (per_row // dim)
        mean = (sum(block.sum(0, dtype=torch.float64) for block in blocks()) / count).float()
        total = sum(global_loss(mean.expand_as(block), block, kind).item() * len(block) for block in blocks())
        result["loss_img_constant_baseline"] = total / count
    if stores.text is not None and len(rows):
        counts = np.bincount(stores.category_index[rows], minlength=len(stores.text))
        text = torch.from_numpy(stores.text.astype(np.float64))                 # [C, T, D]: small
        weights = torch.from_numpy(counts.astype(np.float64))
        mean = torch.einsum("c,ctd->d", weights, text) / (weights.sum() * text.shape[1])
        total = sum(n * global_loss(mean.expand_as(text[c]), text[c], kind).item()
                    for c, n in enumerate(counts) if n)
        result["loss_text_constant_baseline"] = total / counts.sum()
    return result


def run(p: PretrainParams, cache: Path | None = None, out: Path | None = None) -> dict:
    cache = cache or cache_dir()
    out = out or cache / "pretrain"
    result = train(p, cache, out, progress_factory=LossBar, log=console.print)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    model, history = result["model"], result["history"]
    device = next(model.parameters()).device
    metrics = {k: v for k, v in history[-1].items() if k.startswith("loss") or k == "samples_per_s"}
    metrics["epochs"] = len(history)
    metrics.update(constant_baselines(result["stores"], p.global_loss))
    for term in ("img", "text"):
        loss, baseline = metrics.get(f"loss_{term}"), metrics.get(f"loss_{term}_constant_baseline")
        if loss is not None and baseline and loss > 0.95 * baseline:
            console.print(f"[yellow]pretrain: loss_{term} {loss:.4g} is within 5 % of predicting the mean target "
                          f"({baseline:.4g}): nothing shape-specific learned from that teacher yet[/]")
    metrics["probe"] = probe(model, result["stores"], p.n_points, device, p.seed)
    trainstate.save_atomic(out / "model.pt", {"model": model.state_dict(), "config": trainstate.jsonable(model.cfg),
                                              "categories": result["stores"].categories})
    trainstate.write_json(metrics_dir(out) / "metrics.json", metrics)
    trainstate.write_history(metrics_dir(out), history)
    console.print(f"[green]pretrain: done → {out}, {metrics_dir(out)}[/]", metrics)
    return metrics


def params(overrides: dict | None = None) -> PretrainParams:
    return load_params(PretrainParams, "pretrain", overrides)
