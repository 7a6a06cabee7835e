"""Stage `evaluate`: downstream evaluations of the pretrained encoder.

Tasks: ``svm`` (linear SVM on frozen features), ``zeroshot`` (text-teacher prototypes, test split
only), ``fewshot`` (n-way k-shot episodes, a fine-tune per fold) and ``fewshot_probe`` (the same
episodes on frozen features: a linear SVM on the support shapes). With ``baseline`` the same
tasks also run on the checkpoint's network at random init (seeded), reported beside it under
``random_init``. BatchNorm statistics are a controlled variable: the frozen probes (``svm``,
``zeroshot``, ``fewshot_probe``) run for each network under every treatment of ``bn_treatments``
(:data:`recon.pretraining.probes.BN_TREATMENTS`: saved, reset, recalibrated on ``bn_recalibrate``
train clouds), reported per network under ``bn_treatments``; the top-level ``svm`` / ``zeroshot``
are the checkpoint as saved, and ``verdict`` compares that figure, per probe, with the strongest
random-init treatment (:func:`recon.pretraining.probes.verdict`). Outputs of the pipeline's own
run: ``cache/evaluate/zeroshot/confusion.png`` and, git-tracked in ``cache/metrics/evaluate/``,
``details.json`` (one section per task), ``metrics.json`` (the headline dvc.yaml declares:
:func:`headline`) and ``zeroshot/confusion.csv``; a run by hand with ``out`` writes all of them
into that folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import layout
from recon.downstream.cls_data import load_classification
from recon.downstream.evaluate import (
    FewshotSettings,
    fewshot_eval,
    fewshot_from_folds,
    fewshot_probe,
    load_pretrained,
    recalibration_clouds,
    split_features,
    svm_eval,
    zeroshot_eval,
)
from recon.downstream.metrics import write_confusion
from recon.downstream.recipes import FinetuneParams
from recon.downstream.weights import InitSource, load_init
from recon.pretraining.probes import BN_TREATMENTS, check_treatments, per_treatment, random_init_like, verdict
from recon.runtime import trainstate
from recon.runtime.distributed import pick_device
from stages.common import StageError, cache_dir, console, metrics_dir, publish, write_metrics
from stages.params import build_params

TASKS = ("svm", "zeroshot", "fewshot", "fewshot_probe")
#: the tasks measured on frozen features, per network and BatchNorm treatment
PROBES = ("svm", "zeroshot", "fewshot_probe")
#: probe figure -> (task, key in its results), each with a verdict under ``baseline``
PROBE_FIGURES = {"svm": ("svm", "test_acc"), "svm_standardized": ("svm", "test_acc_standardized"),
                 "zeroshot_top1": ("zeroshot", "top1_acc"), "zeroshot_top5": ("zeroshot", "top5_acc")}


#: the headline's columns (``metrics.json``): short name -> a figure of :data:`PROBE_FIGURES`; each has a
#: ``<name>_rand`` twin with ``baseline``. The standardised SVM and zero-shot top-5 stay in the details:
#: few short columns keep ``dvc exp show --only-changed`` of a sweep inside a 160-column terminal.
HEADLINE = {"svm": "svm", "zs_top1": "zeroshot_top1"}


def probe_figures(found: dict) -> dict[str, float]:
    """One network's frozen-probe figures under one BatchNorm treatment, by name: those of
    :data:`PROBE_FIGURES` and, per few-shot probe setting, ``fewshot_probe_<setting>`` (mean over folds,
    raw features) and ``..._standardized``."""
    figures = {figure: found[task][key] for figure, (task, key) in PROBE_FIGURES.items()
               if isinstance(found.get(task), dict) and key in found[task]}
    for setting, r in (found.get("fewshot_probe") or {}).items():
        figures[f"fewshot_probe_{setting}"] = r["mean"]
        figures[f"fewshot_probe_{setting}_standardized"] = r["mean_standardized"]
    return figures


def short_setting(setting: str) -> str:
    """``5way10shot`` -> ``5w10s`` (headline columns stay narrow)."""
    return setting.replace("way", "w").replace("shot", "s")


def headline(details: dict) -> dict:
    """The figures compared across experiments (``metrics.json``), for the checkpoint and, with
    ``baseline``, for its network at random init (suffix ``_rand``): the SVM's held-out accuracy
    (raw features), zero-shot top-1, and the few-shot mean (``fs_5w10s`` for 5way10shot) and std
    (``_sd``) of each setting, and the few-shot probe's mean (``fsp_5w10s``, raw features). The
    checkpoint's probe figures are its BatchNorm statistics as saved; a probe's ``*_rand`` is the
    strongest random-init variant, the max over BatchNorm treatments
    (``verdict``; details written before the treatments: the recalibrated baseline of
    ``random_init``). Everything else stays in ``details.json``."""
    found: dict = {}
    verdicts = details.get("verdict") or {}
    for section, suffix in ((details, ""), (details.get("random_init") or {}, "_rand")):
        by_figure = probe_figures(section)
        if suffix and verdicts:
            by_figure.update({figure: v.get("random_init") for figure, v in verdicts.items()})
        figures = {short: by_figure.get(figure) for short, figure in HEADLINE.items()}
        for setting in details.get("fewshot_probe") or {}:
            figures[f"fsp_{short_setting(setting)}"] = by_figure.get(f"fewshot_probe_{setting}")
        for setting, result in (section.get("fewshot") or {}).items():
            short = short_setting(setting)
            figures.update({f"fs_{short}": result.get("mean"), f"fs_{short}_sd": result.get("std")})
        found.update({k + suffix: v for k, v in figures.items() if isinstance(v, (int, float))})
    return found


@dataclass
class EvaluateParams:
    #: any of svm, zeroshot, fewshot (fine-tunes per fold), fewshot_probe (frozen features, the same episodes)
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
    fewshot_folds: int = 10                       # episodes per setting (mean ± std); fewshot_probe: the same
    fewshot_query: int = 20                       # test shapes per class of an episode
    fewshot_dir: str | None = None                # converted Point-BERT folds instead of sampled episodes
    fewshot_finetune: dict = field(default_factory=dict)   # FinetuneParams overrides (profile: fewshot)
    batch: int = 64                               # clouds per forward
    seed: int = 0                                 # episodes, subsets and the baseline's init
    baseline: bool = False                        # also evaluate the same network at random init (seed)
    #: BatchNorm treatments every network's frozen probes (svm, zeroshot, fewshot_probe) run under (saved | reset |
    #: recalibrated; saved is required): the statistics alone moved a linear probe by up to 7 points, so they are
    #: a controlled variable
    bn_treatments: list[str] = field(default_factory=lambda: list(BN_TREATMENTS))
    bn_recalibrate: int = 256                     # train clouds (seeded) of the recalibrated treatment; 0: none
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
    try:
        treatments = check_treatments(p.bn_treatments)
    except ValueError as err:
        raise StageError(f"bn_treatments: {err}") from None
    device = pick_device(p.device)
    torch.manual_seed(p.seed)
    metrics: dict = {"checkpoint": p.checkpoint, "store": p.store}
    needs_test = set(PROBES) & set(p.tasks) or ("fewshot" in p.tasks and not p.fewshot_dir)
    train = load_classification(p.store, "train") if needs_test else None
    test = load_classification(p.store, "test") if needs_test else None
    needs_model = set(PROBES) & set(p.tasks) or p.baseline
    model = load_pretrained(p.checkpoint).to(device) if needs_model else None
    # (name, network) pairs evaluated side by side: the checkpoint, then its architecture at random init
    nets = [("pretrained", model)] + ([("random_init", random_init_like(model, p.seed).to(device))] if p.baseline else [])
    sections = {name: metrics if name == "pretrained" else metrics.setdefault(name, {"seed": p.seed}) for name, _ in nets}
    probes = [t for t in PROBES if t in p.tasks]
    # the few-shot episodes (seeded): the fine-tunes of ``fewshot`` and the frozen ``fewshot_probe`` share them
    fewshot_settings = FewshotSettings(p.fewshot_ways, p.fewshot_shots, p.fewshot_folds, p.fewshot_query, p.seed)
    if probes:
        clouds = recalibration_clouds(train, p.n_points, p.normalize, p.bn_recalibrate, p.seed, device) \
            if "recalibrated" in treatments else None
        for section in sections.values():
            section["bn_recalibrated_clouds"] = 0 if clouds is None else len(clouds)
        image_store = p.image_store if p.image_store and Path(p.image_store).exists() else None

        def measure(net) -> dict:
            """The frozen probes of one network under one BatchNorm treatment."""
            found = {}
            # the SVM and the few-shot probe read the same frozen features: encode both splits once
            feats = split_features(net, train, test, p.n_points, p.normalize, p.batch, device) \
                if {"svm", "fewshot_probe"} & set(probes) else None
            if "svm" in probes:
                found["svm"] = svm_eval(net, train, test, p.n_points, p.normalize, p.svm_c, p.batch, device, p.seed,
                                        feats=feats)
            if "fewshot_probe" in probes:
                found["fewshot_probe"] = fewshot_probe(feats, train, test, fewshot_settings, p.svm_c)
            if "zeroshot" in probes:
                found["zeroshot"] = zeroshot_eval(net, test, p.text_store, image_store, p.ratio, p.n_points,
                                                  p.normalize, p.batch, device)
            return found

        by_net = {}
        for name, net in nets:
            by_net[name] = per_treatment(net, treatments, clouds, measure)
            for treatment, found in by_net[name].items():
                svm, zs = found.get("svm"), found.get("zeroshot")
                if svm:
                    console.print(f"svm ({name}, BatchNorm {treatment}): train {svm['train_acc']:.2f}%, test "
                                  f"{svm['test_acc']:.2f}% (raw features, as the reference); standardised: train "
                                  f"{svm['train_acc_standardized']:.2f}%, test {svm['test_acc_standardized']:.2f}%")
                if zs:
                    pred = zs.pop("_pred")
                    if name == "pretrained" and treatment == "saved":
                        write_confusion(out / "zeroshot", pred, test.labels, test.class_names,
                                        f"zero-shot top-1 {zs['top1_acc']:.2f}%")
                        if results != out:
                            publish(out / "zeroshot" / "confusion.csv", results / "zeroshot" / "confusion.csv")
                    console.print(f"zeroshot ({name}, BatchNorm {treatment}, {zs['shape_feature']}): top-1 "
                                  f"{zs['top1_acc']:.2f}%, top-5 {zs['top5_acc']:.2f}%")
                for setting, r in (found.get("fewshot_probe") or {}).items():
                    console.print(f"fewshot_probe {setting} ({name}, BatchNorm {treatment}): {r['mean']:.2f} ± "
                                  f"{r['std']:.2f}% (raw), {r['mean_standardized']:.2f} ± {r['std_standardized']:.2f}% "
                                  f"(standardised), {len(r['folds'])} episodes")
            if name == "pretrained":   # the checkpoint as saved keeps the top-level keys (their meaning before)
                metrics.update(by_net[name]["saved"])
            sections[name]["bn_treatments"] = by_net[name]
        if p.baseline:
            # per probe: the checkpoint as saved against the strongest random-init treatment (a max over the
            # baseline's test figures: it only makes the baseline stronger, so the verdict is conservative)
            figures = {name: {t: probe_figures(found) for t, found in by_net[name].items()} for name, _ in nets}
            metrics["verdict"] = {
                figure: verdict({t: f[figure] for t, f in figures["pretrained"].items()},
                                {t: f[figure] for t, f in figures["random_init"].items()})
                for figure in figures["pretrained"]["saved"]}
            for figure, v in metrics["verdict"].items():
                console.print(f"verdict {figure}: pretrained ({v['pretrained_treatment']}) {v['pretrained']:.2f}% vs "
                              f"strongest random init ({v['random_init_treatment']}) {v['random_init']:.2f}%: "
                              f"{v['margin']:+.2f}")
    if "fewshot" in p.tasks:
        ft = FinetuneParams(**{"profile": "fewshot", "votes": 0, "init": p.checkpoint, "device": p.device,
                               **p.fewshot_finetune})
        inits = [("pretrained", load_init(ft.init))]
        # each network once, BatchNorm statistics as saved (a random init: as initialised): fine-tuning trains
        # BatchNorm in train mode, and momentum 0.1 leaves nothing of the initial statistics after tens of steps
        if p.baseline:
            baseline = nets[1][1]
            inits.append(("random_init", InitSource(baseline.state_dict(), trainstate.jsonable(baseline.cfg),
                                                    f"random init (seed {p.seed}) of {p.checkpoint}")))
        for name, init in inits:
            if p.fewshot_dir:
                sections[name]["fewshot"] = fewshot_from_folds(p.fewshot_dir, ft, init, p.seed, console.print)
            else:
                sections[name]["fewshot"] = fewshot_eval(train, test, fewshot_settings, ft, init, console.print)
    write_metrics(results / "metrics.json", metrics, headline(metrics))
    console.print(f"[green]evaluate: done → {results / 'metrics.json'} (details: {results / 'details.json'})[/]")
    return metrics
