"""Stage `finetune`: fine-tune a classifier on a classification store, per seed.

Outputs (``cache/finetune/``): ``seed-<s>/`` (checkpoints, history.csv, model.pt, metrics.json,
confusion.csv/png of each seed) and, at the top level, ``model.pt`` and ``confusion.png`` of the first
seed. Git-tracked results (``cache/metrics/finetune/``): ``metrics.json`` (the seed's metrics, or
mean ± std over a ``seeds`` sweep with every seed's numbers), ``history.csv`` and ``confusion.csv``
of the first seed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import layout
from pipeline.store import open_store
from recon import trainstate
from recon.distributed import setup, teardown
from recon.cls_data import load_classification
from recon.finetune import FinetuneParams, finetune
from recon.metrics import summarise_seeds
from recon.weights import load_init
from stages.common import LossBar, cache_dir, console, load_params, metrics_dir, publish

TOP_LEVEL = ("model.pt", "confusion.png")       # the first seed's, DVC-cached in cache/finetune
PUBLISHED = ("history.csv", "confusion.csv")    # the first seed's, git-tracked in cache/metrics/finetune


def params(overrides: dict | None = None) -> FinetuneParams:
    return load_params(FinetuneParams, "finetune", overrides)


def run(p: FinetuneParams, out: Path | None = None) -> dict:
    out = out or layout.CacheLayout(cache_dir()).stage("finetune")
    d = setup(p.device)
    try:
        store = open_store(p.store)
        p.check_store(store.params)
        train, test = load_classification(p.store, "train"), load_classification(p.store, "test")
        init = load_init(p.init)
        if d.is_main:
            console.print(f"finetune: {p.profile} / {p.protocol}, {len(train)} train and {len(test)} test "
                          f"shapes, {train.num_classes} classes, init {init.source if init else 'scratch'}")
        per_seed = []
        for seed in p.seed_list():
            result = finetune(p, train, test, seed, out / f"seed-{seed}", d, init, store.params,
                              progress_factory=LossBar, log=console.print)
            per_seed.append(result.metrics)
        if not d.is_main:
            return {}
        metrics = per_seed[0] if len(per_seed) == 1 else summarise_seeds(per_seed)
        first = out / f"seed-{p.seed_list()[0]}"
        for name in TOP_LEVEL:
            if (first / name).exists():
                shutil.copy2(first / name, out / name)
        for name in PUBLISHED:
            if (first / name).exists():
                publish(first / name, metrics_dir(out) / name)
        trainstate.write_json(metrics_dir(out) / "metrics.json", metrics)
        headline = {k: round(v, 2) for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)}
        console.print(f"[green]finetune: done → {out}[/]", headline)
        return metrics
    finally:
        teardown(d)
