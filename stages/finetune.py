"""Stage `finetune` (classification) and stage `partseg` (part segmentation): fine-tune the
pretrained encoder on a downstream store, per seed, with the one loop of ``recon.downstream.finetune``.

Outputs (``cache/finetune/`` or ``cache/partseg/``): ``seed-<s>/`` (checkpoints, history.csv,
model.pt, metrics.json and the picture of each seed: confusion.csv/png, or parts.png) and, at the
top level, ``model.pt`` and the picture of the first seed. Git-tracked results
(``cache/metrics/finetune/``, ``cache/metrics/partseg/``): ``details.json`` (the seed's metrics,
or mean ± std over a ``seeds`` sweep with every seed's numbers), ``metrics.json``, the headline
dvc.yaml declares (:data:`HEADLINE`), and ``history.csv`` (and ``confusion.csv``) of the first seed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline import layout
from pipeline.store import open_store
from recon.downstream.cls_data import load_classification
from recon.downstream.finetune import finetune
from recon.downstream.metrics import summarise_seeds
from recon.downstream.partseg_data import load_partseg
from recon.downstream.partseg_finetune import PICTURE, finetune_partseg
from recon.downstream.recipes import FinetuneParams, PartSegParams
from recon.downstream.weights import load_init
from recon.runtime.distributed import setup, teardown
from stages.common import LossBar, StageError, cache_dir, console, metrics_dir, publish, write_metrics
from stages.params import build_params

#: task -> (params.yaml section = stage name = output folder, params class)
TASKS = {"classification": ("finetune", FinetuneParams), "partseg": ("partseg", PartSegParams)}
TOP_LEVEL = {"classification": ("model.pt", "confusion.png"), "partseg": ("model.pt", PICTURE)}   # DVC-cached
PUBLISHED = {"classification": ("history.csv", "confusion.csv"), "partseg": ("history.csv",)}      # git-tracked
#: the figures compared across experiments (``metrics.json``), per task, short column name -> details
#: key: the validation accuracy that may choose a run (with ``val_fraction``), the single-pass and voted
#: test accuracy; the instance mIoU (the class mIoU and per-category figures stay in the details). A
#: ``seeds`` sweep reports the mean under the same name and the std as ``<name>_sd``, so single runs and
#: sweeps share columns in ``dvc exp show``.
HEADLINE = {"classification": {"ft_val": "val_acc", "ft_acc": "test_acc", "ft_vote": "test_vote_acc"},
            "partseg": {"miou": "test_instance_miou"}}


def headline(details: dict, task: str = "classification") -> dict:
    """The task's :data:`HEADLINE` figures of one seed's details or of a sweep's summary."""
    found = {}
    for short, key in HEADLINE[task].items():
        for name, source in ((short, key), (short, f"{key}_mean"), (f"{short}_sd", f"{key}_std")):
            if isinstance(details.get(source), (int, float)):
                found[name] = details[source]
    return found


def params(overrides: dict | None = None, task: str = "classification",
           sets: list[str] | None = None) -> FinetuneParams:
    if task not in TASKS:
        raise StageError(f"unknown task {task!r}; choose from {list(TASKS)}")
    section, cls = TASKS[task]
    p = build_params(cls, section, overrides, sets)
    if p.task != task:
        raise StageError(f"params section {section!r}: profile {p.profile!r} is a {p.task} recipe, not {task}")
    return p


def run(p: FinetuneParams, out: Path | None = None) -> dict:
    task = p.task
    out = out or layout.CacheLayout(cache_dir()).stage(TASKS[task][0])
    from pipeline.unused import unused_reason

    if reason := unused_reason(p.store):
        return write_unused(task, out, f"{p.store} is not used ({reason})")
    d = setup(p.device)
    try:
        store = open_store(p.store)
        if task == "partseg":  # the reference trains on train + val
            fit = [s for s in ("train", "val") if s in store.params.get("splits", [])]
            train, test, run_one = load_partseg(p.store, fit), load_partseg(p.store, "test"), finetune_partseg
        else:
            p.check_store(store.params)
            fit = ["train"]
            train, test, run_one = load_classification(p.store, "train"), load_classification(p.store, "test"), finetune
        init = load_init(p.init)
        if d.is_main:
            console.print(f"{TASKS[task][0]}: {p.profile} / {p.protocol}, {len(train)} {'+'.join(fit)} and "
                          f"{len(test)} test shapes, {train.num_classes} classes, "
                          f"init {init.source if init else 'scratch'}")
        per_seed = []
        for seed in p.seed_list():
            result = run_one(p, train, test, seed, out / f"seed-{seed}", d, init, store.params,
                             progress_factory=LossBar, log=console.print)
            per_seed.append(result.metrics)
        if not d.is_main:
            return {}
        metrics = per_seed[0] if len(per_seed) == 1 else summarise_seeds(per_seed, task)
        first = out / f"seed-{p.seed_list()[0]}"
        for name in TOP_LEVEL[task]:
            if (first / name).exists():
                shutil.copy2(first / name, out / name)
        for name in PUBLISHED[task]:
            if (first / name).exists():
                publish(first / name, metrics_dir(out) / name)
        figures = headline(metrics, task)
        write_metrics(metrics_dir(out) / "metrics.json", metrics, figures)
        console.print(f"[green]{TASKS[task][0]}: done → {out}[/]", {k: round(v, 2) for k, v in figures.items()})
        return metrics
    finally:
        teardown(d)


def write_unused(task: str, out: Path, reason: str) -> dict:
    """The outputs DVC expects, as placeholders, when the store is a placeholder (the demo's part
    labels on a run over your own meshes): ``model.pt`` holds only the reason (export skips it),
    the picture says it, the history has its header, the headline is empty."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    torch.save({"task": task, "not_used": reason}, out / "model.pt")
    picture = Image.new("RGB", (640, 40), (255, 255, 255))
    ImageDraw.Draw(picture).text((8, 14), f"not used: {reason}"[:100], fill=(0, 0, 0))
    picture.save(out / TOP_LEVEL[task][1])
    for name in PUBLISHED[task]:
        (metrics_dir(out) / name).parent.mkdir(parents=True, exist_ok=True)
        (metrics_dir(out) / name).write_text("epoch\n" if name == "history.csv" else "")
    write_metrics(metrics_dir(out) / "metrics.json", {"not_used": reason}, {})
    console.print(f"{TASKS[task][0]}: not needed: {reason}")
    return {}
