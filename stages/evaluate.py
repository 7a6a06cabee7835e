"""Stage `evaluate`: downstream evaluations of the pretrained encoder.

Tasks: ``svm`` (linear SVM on frozen features), ``zeroshot`` (text-teacher prototypes, test split
only) and ``fewshot`` (n-way k-shot episodes, a fine-tune per fold). With ``baseline`` the same
tasks also run on the checkpoint's network at random init (seeded), reported beside it under
``random_init``. Outputs of the pipeline's own run: ``cache/evaluate/zeroshot/confusion.png`` and,
git-tracked in ``cache/metrics/evaluate/``, ``details.json`` (one section per task), ``metrics.json``
(the headline dvc.yaml declares: :func:`headline`) and ``zeroshot/confusion.csv``; a run by hand
with ``out`` writes all of them into that folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import layout
from recon.downstream.cls_data import load_classification
from recon.downstream.evaluate import (
    FewshotSettings,
    baseline_batchnorm,
    fewshot_eval,
    fewshot_from_folds,
    load_pretrained,
    svm_eval,
    zeroshot_eval,
)
from recon.downstream.metrics import write_confusion
from recon.downstream.recipes import FinetuneParams
from recon.downstream.weights import InitSource, load_init
from recon.pretraining.probes import random_init_like
from recon.runtime import trainstate
from recon.runtime.distributed import pick_device
from stages.common import StageError, build_params, cache_dir, console, metrics_dir, publish, write_metrics

TASKS = ("svm", "zeroshot", "fewshot")


def headline(details: dict) -> dict:
    """The figures compared across experiments (``metrics.json``), for the checkpoint and, with
    ``baseline``, for its network at random init (suffix ``_random_init``): the SVM's held-out
    accuracy on raw and on standardised features, zero-shot top-1 / top-5, and the few-shot mean
    ± std of each setting. Everything else stays in ``details.json``."""
    found: dict = {}
    for section, suffix in ((details, ""), (details.get("random_init") or {}, "_random_init")):
        svm, zs = section.get("svm") or {}, section.get("zeroshot") or {}
        figures = {"svm": svm.get("test_acc"), "svm_standardized": svm.get("test_acc_standardized"),
                   "zeroshot_top1": zs.get("top1_acc"), "zeroshot_top5": zs.get("top5_acc")}
        for setting, result in (section.get("fewshot") or {}).items():
            figures.update({f"fewshot_{setting}": result.get("mean"), f"fewshot_{setting}_std": result.get("std")})
        found.update({k + suffix: v for k, v in figures.items() if isinstance(v, (int, float))})
    return found


@dataclass
class EvaluateParams:
    #: any of svm, zeroshot, fewshot (fine-tunes per fold)
    tasks: list[str] = field(default_factory=lambda: ["svm", "zeroshot"])
    checkpoint: str = layout.default(layout.PRETRAINED)  # ours (model.pt / epoch checkpoint) or a reference .pth
    store: str = layout.default(layout.DEMO_STORE) # classification store (train + test splits)
    n_points: int = 1024                          # points per cloud
    normalize: bool = True                        # centre + unit sphere before sampling
    svm_c: float = 0.075                          # the linear SVM's C
    text_store: str = layout.default(layout.TEXT_FEATURES)  # text-teacher features (zero-shot prototypes)
    image_store: str | None = layout.default(layout.IMAGE_FEATURES)   # decides whether IMG joins (CLIP teachers)
    ratio: float = 0.25                           # r in img_proj(IMG) + r * text_proj(TXT)
    fewshot_ways: list[int] = field(default_factory=lambda: [5, 10])    # n of the n-way k-shot episodes
    fewshot_shots: list[int] = field(default_factory=lambda: [10, 20])  # k of the n-way k-shot episodes
    fewshot_folds: int = 10                       # episodes per setting (mean ± std)
    fewshot_query: int = 20                       # test shapes per class of an episode
    fewshot_dir: str | None = None                # converted Point-BERT folds instead of sampled episodes
    fewshot_finetune: dict = field(default_factory=dict)   # FinetuneParams overrides (profile: fewshot)
    batch: int = 64                               # clouds per forward
    seed: int = 0                                 # episodes, subsets and the baseline's init
    baseline: bool = False                        # also evaluate the same network at random init (seed)
    bn_recalibrate: int = 256                     # the baseline's BatchNorm statistics from this many train clouds
    out: str | None = None                        # folder of metrics.json; None = <cache>/evaluate
    device: str = "auto"                          # auto | cpu | cuda[:i]


def params(overrides: dict | None = None, sets: list[str] | None = None) -> EvaluateParams:
    return build_params(EvaluateParams, "evaluate", overrides, sets)


def run(p: EvaluateParams, out: Path | None = None) -> dict:
    if out is None and p.out:   # by hand: everything in the given folder
        out = results = Path(p.out)
    else:                       # the pipeline's own: metrics git-tracked in cache/metrics/evaluate
        out = out or layout.CacheLayout(cache_dir()).stage("evaluate")
        results = metrics_dir(out)
    unknown = sorted(set(p.tasks) - set(TASKS))
    if unknown:
        raise StageError(f"unknown evaluate task(s) {unknown}; choose from {TASKS}")
    device = pick_device(p.device)
    torch.manual_seed(p.seed)
    metrics: dict = {"checkpoint": p.checkpoint, "store": p.store}
    needs_test = {"svm", "zeroshot"} & set(p.tasks) or ("fewshot" in p.tasks and not p.fewshot_dir)
    train = load_classification(p.store, "train") if needs_test else None
    test = load_classification(p.store, "test") if needs_test else None
    needs_model = {"svm", "zeroshot"} & set(p.tasks) or p.baseline
    model = load_pretrained(p.checkpoint).to(device) if needs_model else None
    # (name, network) pairs evaluated side by side: the checkpoint, then its architecture at random init
    nets = [("pretrained", model)] + ([("random_init", random_init_like(model, p.seed).to(device))] if p.baseline else [])
    sections = {name: metrics if name == "pretrained" else metrics.setdefault(name, {"seed": p.seed}) for name, _ in nets}
    if p.baseline:  # fresh BatchNorm running stats (mean 0, var 1) are not the network's statistics on any data
        calibrated = baseline_batchnorm(nets[1][1], train, p.n_points, p.normalize, p.bn_recalibrate, p.seed, device)
        sections["random_init"]["bn_recalibrated_clouds"] = calibrated
    if "svm" in p.tasks:
        for name, net in nets:
            svm = sections[name]["svm"] = svm_eval(net, train, test, p.n_points, p.normalize, p.svm_c, p.batch,
                                                   device, p.seed)
            console.print(f"svm ({name}): train {svm['train_acc']:.2f}%, test {svm['test_acc']:.2f}% (raw features, "
                          f"as the reference); standardised: train {svm['train_acc_standardized']:.2f}%, "
                          f"test {svm['test_acc_standardized']:.2f}%")
    if "zeroshot" in p.tasks:
        image_store = p.image_store if p.image_store and Path(p.image_store).exists() else None
        for name, net in nets:
            zs = zeroshot_eval(net, test, p.text_store, image_store, p.ratio, p.n_points, p.normalize, p.batch, device)
            pred = zs.pop("_pred")
            if name == "pretrained":
                write_confusion(out / "zeroshot", pred, test.labels, test.class_names,
                                f"zero-shot top-1 {zs['top1_acc']:.2f}%")
                if results != out:
                    publish(out / "zeroshot" / "confusion.csv", results / "zeroshot" / "confusion.csv")
            sections[name]["zeroshot"] = zs
            console.print(f"zeroshot ({name}, {zs['shape_feature']}): top-1 {zs['top1_acc']:.2f}%, "
                          f"top-5 {zs['top5_acc']:.2f}%")
    if "fewshot" in p.tasks:
        ft = FinetuneParams(**{"profile": "fewshot", "votes": 0, "init": p.checkpoint, "device": p.device,
                               **p.fewshot_finetune})
        inits = [("pretrained", load_init(ft.init))]
        if p.baseline:
            baseline = nets[1][1]
            inits.append(("random_init", InitSource(baseline.state_dict(), trainstate.jsonable(baseline.cfg),
                                                    f"random init (seed {p.seed}) of {p.checkpoint}")))
        for name, init in inits:
            if p.fewshot_dir:
                sections[name]["fewshot"] = fewshot_from_folds(p.fewshot_dir, ft, init, p.seed, console.print)
            else:
                settings = FewshotSettings(p.fewshot_ways, p.fewshot_shots, p.fewshot_folds, p.fewshot_query, p.seed)
                sections[name]["fewshot"] = fewshot_eval(train, test, settings, ft, init, console.print)
    write_metrics(results / "metrics.json", metrics, headline(metrics))
    console.print(f"[green]evaluate: done → {results / 'metrics.json'} (details: {results / 'details.json'})[/]")
    return metrics
