"""Stage `evaluate`: downstream evaluations of the pretrained encoder.

Tasks: ``svm`` (linear SVM on frozen features), ``zeroshot`` (text-teacher prototypes, test split
only) and ``fewshot`` (n-way k-shot episodes, a fine-tune per fold). Outputs:
``cache/evaluate/zeroshot/confusion.png`` and, git-tracked in ``cache/metrics/evaluate/``,
``metrics.json`` (one section per task) and ``zeroshot/confusion.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from recon import trainstate
from recon.distributed import pick_device
from recon.evaluate import (
    FewshotSettings,
    fewshot_eval,
    fewshot_from_folds,
    load_pretrained,
    svm_eval,
    zeroshot_eval,
)
from recon.finetune import (
    FinetuneParams,
    load_classification,
    load_init,
    write_confusion,
)
from stages.common import StageError, cache_dir, console, load_params, metrics_dir, publish

TASKS = ("svm", "zeroshot", "fewshot")


@dataclass
class EvaluateParams:
    tasks: list[str] = field(default_factory=lambda: ["svm", "zeroshot"])
    checkpoint: str = "cache/pretrain/model.pt"   # ours (model.pt / epoch checkpoint) or a reference .pth
    store: str = "cache/downstream/demo.zarr"     # classification store (train + test splits)
    n_points: int = 1024
    normalize: bool = True
    svm_c: float = 0.075
    text_store: str = "cache/teachers/text.zarr"
    image_store: str | None = "cache/teachers/image.zarr"   # decides whether IMG joins (CLIP teachers)
    ratio: float = 0.25                           # r in img_proj(IMG) + r * text_proj(TXT)
    fewshot_ways: list[int] = field(default_factory=lambda: [5, 10])
    fewshot_shots: list[int] = field(default_factory=lambda: [10, 20])
    fewshot_folds: int = 10
    fewshot_query: int = 20
    fewshot_dir: str | None = None                # converted Point-BERT folds instead of sampled episodes
    fewshot_finetune: dict = field(default_factory=dict)   # FinetuneParams overrides (profile: fewshot)
    batch: int = 64
    seed: int = 0
    device: str = "auto"


def params(overrides: dict | None = None) -> EvaluateParams:
    return load_params(EvaluateParams, "evaluate", overrides)


def run(p: EvaluateParams, out: Path | None = None) -> dict:
    out = out or cache_dir() / "evaluate"
    unknown = sorted(set(p.tasks) - set(TASKS))
    if unknown:
        raise StageError(f"unknown evaluate task(s) {unknown}; choose from {TASKS}")
    device = pick_device(p.device)
    torch.manual_seed(p.seed)
    metrics: dict = {"checkpoint": p.checkpoint, "store": p.store}
    needs_test = {"svm", "zeroshot"} & set(p.tasks) or ("fewshot" in p.tasks and not p.fewshot_dir)
    train = load_classification(p.store, "train") if needs_test else None
    test = load_classification(p.store, "test") if needs_test else None
    model = load_pretrained(p.checkpoint).to(device) if {"svm", "zeroshot"} & set(p.tasks) else None
    if "svm" in p.tasks:
        metrics["svm"] = svm_eval(model, train, test, p.n_points, p.normalize, p.svm_c, p.batch, device, p.seed)
        svm = metrics["svm"]
        console.print(f"svm: train {svm['train_acc']:.2f}%, test {svm['test_acc']:.2f}% (raw features, as the "
                      f"reference); standardised: train {svm['train_acc_standardized']:.2f}%, "
                      f"test {svm['test_acc_standardized']:.2f}%")
    if "zeroshot" in p.tasks:
        image_store = p.image_store if p.image_store and Path(p.image_store).exists() else None
        zs = zeroshot_eval(model, test, p.text_store, image_store, p.ratio, p.n_points, p.normalize, p.batch, device)
        write_confusion(out / "zeroshot", zs.pop("_pred"), test.labels, test.class_names,
                        f"zero-shot top-1 {zs['top1_acc']:.2f}%")
        publish(out / "zeroshot" / "confusion.csv", metrics_dir(out) / "zeroshot" / "confusion.csv")
        metrics["zeroshot"] = zs
        console.print(f"zeroshot ({zs['shape_feature']}): top-1 {zs['top1_acc']:.2f}%, top-5 {zs['top5_acc']:.2f}%")
    if "fewshot" in p.tasks:
        ft = FinetuneParams(**{"profile": "fewshot", "votes": 0, "init": p.checkpoint, "device": p.device,
                               **p.fewshot_finetune})
        init = load_init(ft.init)
        if p.fewshot_dir:
            metrics["fewshot"] = fewshot_from_folds(p.fewshot_dir, ft, init, p.seed, console.print)
        else:
            settings = FewshotSettings(p.fewshot_ways, p.fewshot_shots, p.fewshot_folds, p.fewshot_query, p.seed)
            metrics["fewshot"] = fewshot_eval(train, test, settings, ft, init, console.print)
    trainstate.write_json(metrics_dir(out) / "metrics.json", metrics)
    console.print(f"[green]evaluate: done → {metrics_dir(out) / 'metrics.json'}[/]")
    return metrics
