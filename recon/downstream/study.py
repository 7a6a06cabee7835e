"""The ablation study: does pretraining help, and which part of ReCon does?

Arms (equal budgets: every pretrained arm runs the same ``PretrainParams`` and differs only in the
overrides of :data:`ARMS`): random init (no pretraining), reconstruction only (Point-MAE), distillation
only, full ReCon on raw or standardised targets, and one arm per row of the paper's ablation tables
(targets, Table 4; the distillation metric, Table 5; stop-gradient, Table 6; the vanilla multi-task and
two-tower baselines and the single-modal / cross-modal contrastive-only networks, Table 9; paired vs
unpaired teacher images, Table 14). A preset (:data:`PRESETS`, ``recon study --preset table4``) picks
the arms of one table, and its table.md prints the paper's own figures (:data:`PAPER`) beside ours.
Each encoder is evaluated on the held-out (test) split of every downstream store by

- k-NN (cosine, k = 5, or 1 when some class has fewer than 5 train shapes) on the 4C features,
- linear SVM (``LinearSVC(C=0.075)``) on the reference 2C features, raw and train-standardised,
- few-shot: N-way K-shot episodes over folds, a fine-tune per fold (mean ± std over folds),
- fine-tuning from the encoder with several seeds (mean ± std over seeds),

the frozen probes (k-NN, SVM) under every BatchNorm treatment of ``bn_treatments`` for every arm
(:data:`recon.pretraining.probes.BN_TREATMENTS`; the arm's top-level figures are its statistics as
saved, the random-init arm's as initialised), with a verdict per pretrained arm, store and probe:
its saved figure against the random-init arm's strongest treatment (``verdict`` in results.json,
a table in table.md), and, per arm, the monitor's held-out probe after every pretraining epoch (the plot),
and its parameter counts (the encoder that probes and fine-tuning use, the whole pretraining network).
Results go to ``results.json``, ``table.md`` and ``probe_vs_epochs.png``; an arm's finished results are
reused when the study is run again with the same settings (the list of arms and the preset are not
part of them: adding an arm, or rerunning an interrupted preset, recomputes only what is missing).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.downstream.cls_data import ClsData, eval_clouds, load_classification
from recon.downstream.evaluate import FewshotSettings, fewshot_eval, recalibration_clouds
from recon.downstream.finetune import finetune
from recon.downstream.recipes import FinetuneParams
from recon.downstream.weights import InitSource
from recon.network.model import ReConPretrain, head_input, svm_input
from recon.pretraining.data import open_pretrain_stores
from recon.pretraining.probes import (
    BN_TREATMENTS,
    batched,
    check_treatments,
    knn_probe,
    per_treatment,
    svm_accuracy,
    verdict,
)
from recon.pretraining.trainer import PretrainParams, build_model, train
from recon.runtime import codedeps, trainstate

#: full ReCon's three losses: the ablation arms below pin them, then change one factor
RECON = {"targets": ["rec", "img", "text"]}
#: arm -> PretrainParams overrides (None: no pretraining). Every pretrained arm is the study's shared
#: pretraining (``StudyParams.pretrain``: params.yaml ``pretrain`` + ``study.pretrain``) with these overrides.
ARMS: dict[str, dict | None] = {
    "random_init": None,
    "rec_only": {"targets": ["rec"]},
    "distill_only": {"targets": ["img", "text"]},
    "recon_raw": {**RECON, "target_norm": "none"},
    "recon_std": {**RECON, "target_norm": "store"},
    # the released configuration, for reference: raw targets, SmoothL1, no BatchNorm recalibration, the
    # reference architecture (no model overrides such as proj_norm)
    "recon_reference": {**RECON, "target_norm": "none", "global_loss": "smooth_l1", "bn_recalibrate": 0, "model": {}},
    # Table 4: the pretraining targets (SMC: the single-modal supervised contrastive loss on [CLS])
    "targets_rec": {"targets": ["rec"]},
    "targets_rec_img": {"targets": ["rec", "img"]},
    "targets_rec_text": {"targets": ["rec", "text"]},
    "targets_all": RECON,
    "targets_smc": {"targets": ["rec", "smc"]},
    # Table 5: the distillation losses' metric
    "metric_smooth_l1": {**RECON, "global_loss": "smooth_l1"},
    "metric_l2": {**RECON, "global_loss": "l2"},
    "metric_cosine": {**RECON, "global_loss": "cosine"},
    "metric_infonce": {**RECON, "global_loss": "infonce"},
    # Table 6: the queries read the patch tokens detached (on) or not (off)
    "stopgrad_on": {**RECON, "stop_grad": True},
    "stopgrad_off": {**RECON, "stop_grad": False},
    # Table 14: a shape's own image targets, or another same-category shape's (reshuffled every epoch)
    "images_paired": {**RECON, "image_pairing": "paired"},
    "images_unpaired": {**RECON, "image_pairing": "unpaired"},
    # Table 9: baselines as networks of their own (no cross attention, so no stop-gradient)
    "multitask": {**RECON, "architecture": "multitask", "stop_grad": False},
    "two_tower": {**RECON, "architecture": "two_tower", "stop_grad": False},
    "smc_only": {"targets": ["smc"], "architecture": "multitask", "stop_grad": False},
    "cmc_only": {"targets": ["img", "text"], "architecture": "multitask", "stop_grad": False},
}
LABELS = {"random_init": "random init", "rec_only": "reconstruction only (Point-MAE)",
          "distill_only": "distillation only", "recon_raw": "ReCon, raw targets",
          "recon_std": "ReCon, standardised targets", "recon_reference": "ReCon, reference settings",
          "targets_rec": "reconstruction only (Point-MAE)", "targets_rec_img": "reconstruction + image",
          "targets_rec_text": "reconstruction + text", "targets_all": "reconstruction + image + text (ReCon)",
          "targets_smc": "reconstruction + SMC (ReCon + SMC)",
          "metric_smooth_l1": "smooth L1 (ReCon)", "metric_l2": "L2 distance", "metric_cosine": "cosine similarity",
          "metric_infonce": "InfoNCE", "stopgrad_on": "stop-gradient on (ReCon)", "stopgrad_off": "stop-gradient off",
          "images_paired": "paired images (ReCon)", "images_unpaired": "unpaired images (same category)",
          "multitask": "vanilla multi-task", "two_tower": "two-tower network",
          "smc_only": "SMC only (plain Transformer)", "cmc_only": "CMC only (plain Transformer)"}

#: preset -> the arms of one of the paper's ablation tables (``recon study --preset``), random init first
PRESETS: dict[str, list[str]] = {
    "table4": ["random_init", "targets_rec", "targets_rec_img", "targets_rec_text", "targets_all", "targets_smc"],
    "table5": ["random_init", "metric_smooth_l1", "metric_l2", "metric_cosine", "metric_infonce"],
    "table6": ["random_init", "stopgrad_on", "stopgrad_off"],
    "table9": ["random_init", "smc_only", "cmc_only", "targets_rec", "multitask", "two_tower", "targets_smc",
               "targets_all"],
    "table14": ["random_init", "images_paired", "images_unpaired"],
}
#: The paper's own figures per preset (ReCon, ICML 2023), copied from PAPER_RESULTS.md of the shared folder
#: beside the clone (``../shared``; the tables named in ``source``; tests/test_study.py checks the copy against
#: it): ReCon-Base pretrained on ShapeNet for 300 epochs on GPUs, fine-tuned overall accuracy in %, no voting
#: (Table 14's third column: zero-shot top-1). At the paper's scale, not ours: printed beside our figures for
#: the direction of each effect, never as a target. ``columns`` names each figure; ``arms`` maps an arm to its
#: row's figures, as the paper prints them.
PAPER_SCALE = "ReCon-Base, ShapeNet, 300 epochs, GPU"
PAPER: dict[str, dict] = {
    "table4": {"source": "Table 4 (pretraining targets)", "columns": ["ScanObjectNN PB_T50_RS"],
               "arms": {"targets_rec": ["88.42"], "targets_rec_img": ["90.18"], "targets_rec_text": ["89.77"],
                        "targets_all": ["90.63"], "targets_smc": ["89.50"]}},
    "table5": {"source": "Table 5 (contrastive metric)", "columns": ["ScanObjectNN PB_T50_RS", "ModelNet40"],
               "arms": {"metric_smooth_l1": ["90.63", "94.1"], "metric_l2": ["89.64", "93.6"],
                        "metric_cosine": ["90.17", "93.8"], "metric_infonce": ["90.11", "93.8"]}},
    "table6": {"source": "Table 6 (stop-gradient)", "columns": ["ScanObjectNN PB_T50_RS", "ModelNet40"],
               "arms": {"stopgrad_on": ["90.63", "94.1"], "stopgrad_off": ["81.60", "89.7"]}},
    "table9": {"source": "Table 9 (baselines)", "columns": ["ScanObjectNN PB_T50_RS", "ModelNet40"],
               "arms": {"smc_only": ["81.70", "91.2"], "cmc_only": ["82.48", "91.4"],
                        "targets_rec": ["88.42", "93.5"], "multitask": ["82.53", "91.6"],
                        "two_tower": ["85.05", "92.1"], "targets_smc": ["89.73", "94.0"],
                        "targets_all": ["90.63", "94.1"]}},
    "table14": {"source": "Table 14 (paired vs unpaired images)",
                "columns": ["ScanObjectNN PB_T50_RS", "ModelNet40", "ModelNet40 zero-shot (train+test)"],
                "arms": {"images_paired": ["90.63", "94.5", "66.8"], "images_unpaired": ["90.22", "93.8", "60.4"]}},
}
#: the files whose source decides an arm's result: this module's import closure (a finished arm
#: is reused only while they are unchanged)
STUDY_CODE = codedeps.closure(__name__)


@dataclass
class StudyParams:
    #: the arms to compare (recon.downstream.study.ARMS): random_init | rec_only | distill_only | recon_raw |
    #: recon_std | recon_reference | targets_* | metric_* | stopgrad_* | images_* | multitask | two_tower | ...
    arms: list[str] = field(default_factory=lambda: ["random_init", "rec_only", "distill_only", "recon_raw",
                                                     "recon_std"])
    #: table4 | table5 | table6 | table9 | table14: the arms of that paper table (instead of arms), and the
    #: paper's own figures beside ours in table.md; null: arms as given
    preset: str | None = None
    pretrain: dict = field(default_factory=dict)      # PretrainParams shared by every arm (equal budgets)
    stores: dict = field(default_factory=dict)        # name -> classification store (held-out = its test split)
    knn_k: int = 5                                    # neighbours of the k-NN probe
    finetune: dict = field(default_factory=lambda: {"profile": "demo", "votes": 0})   # FinetuneParams overrides
    finetune_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])   # fine-tuning runs per arm (mean ± std)
    #: FewshotSettings: ways, shots, folds, query
    fewshot: dict = field(default_factory=lambda: {"ways": [5], "shots": [5], "folds": 5, "query": 5})
    #: FinetuneParams overrides of the few-shot fine-tunes
    fewshot_finetune: dict = field(default_factory=lambda: {"profile": "demo", "votes": 0})
    #: BatchNorm treatments every arm's frozen probes run under (saved | reset | recalibrated; saved is
    #: required): the statistics alone moved a linear probe by up to 7 points, so they are a controlled variable
    bn_treatments: list[str] = field(default_factory=lambda: list(BN_TREATMENTS))
    bn_recalibrate: int = 256                         # train clouds (seeded) per store of the recalibrated treatment
    seed: int = 0                                     # every arm's seed (pretraining, probes, episodes)
    device: str = "auto"                              # auto | cpu | cuda[:i]


def study_arms(p: StudyParams) -> list[str]:
    """The arms the study runs: its preset's (:data:`PRESETS`), or ``p.arms``; refuses unknown names."""
    if p.preset is not None and p.preset not in PRESETS:
        raise ValueError(f"unknown preset {p.preset!r}; choose from {list(PRESETS)}")
    arms = PRESETS[p.preset] if p.preset else p.arms
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    return list(arms)


def arm_params(p: StudyParams, arm: str) -> PretrainParams:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {list(ARMS)}")
    values = {"seed": p.seed, "device": p.device, **p.pretrain, **copy.deepcopy(ARMS[arm] or {})}
    return PretrainParams(**values)


def parameter_counts(model: ReConPretrain) -> dict[str, Any]:
    """Parameters of the arm's network: ``encoder`` (what the probes read and fine-tuning trains, its
    head aside) and ``pretraining`` (with the decoder, rebuild head and projections), and its architecture."""
    return {"architecture": model.cfg.architecture, "encoder": sum(t.numel() for t in model.encoder.parameters()),
            "pretraining": sum(t.numel() for t in model.parameters())}


def encoder_for(p: StudyParams, arm: str, cache: Path, out: Path, log=print) -> tuple[ReConPretrain, list[dict]]:
    """The arm's encoder (pretrained, or its random init) and its pretraining history."""
    pp = arm_params(p, arm)
    if ARMS[arm] is not None:
        result = train(pp, cache, out / "pretrain", log=log)
        return result["model"].eval(), result["history"]
    # random init: exactly the starting point of every pretrained arm (same seed, same config), its BatchNorm
    # statistics as initialised; the frozen probes measure it under every treatment (evaluate_arm)
    stores = open_pretrain_stores(cache, "img" in pp.targets, "text" in pp.targets)
    torch.manual_seed(pp.seed)
    model = build_model(pp, stores.image_dim, stores.text_dim)
    return model.eval(), []


@torch.no_grad()
def frozen_probe(model: ReConPretrain, train: ClsData, test: ClsData, n_points: int, k: int, seed: int,
                 device) -> dict[str, float]:
    """k-NN on the 4C features and the linear SVM (raw, standardised) on the 2C features, in %."""
    model.eval().to(device)

    def both(x):
        tokens = model.encode(x)
        return head_input(tokens, model.cfg.img_queries), svm_input(tokens, model.cfg.img_queries)

    (knn_tr, svm_tr), (knn_te, svm_te) = (batched(both, eval_clouds(d, n_points, True, device), 64, device)
                                          for d in (train, test))
    k = k if np.bincount(train.labels).min() >= k else 1
    mean, std = svm_tr.mean(0), svm_tr.std(0) + 1e-6
    return {"knn": 100 * knn_probe(knn_tr, train.labels, knn_te, test.labels, k), "knn_k": k,
            "svm": svm_accuracy(svm_tr, train.labels, svm_te, test.labels, seed=seed)[1],
            "svm_std": svm_accuracy((svm_tr - mean) / std, train.labels, (svm_te - mean) / std, test.labels,
                                    seed=seed)[1]}


PROBE_KEYS = ("knn", "svm", "svm_std")


def frozen_probes(model: ReConPretrain, train: ClsData, test: ClsData, n_points: int, k: int, seed: int, device,
                  treatments: list[str], recalibrate: int) -> dict[str, dict[str, float]]:
    """:func:`frozen_probe` under every BatchNorm treatment ({treatment: probe}); ``recalibrated``
    re-estimates the statistics on ``recalibrate`` train clouds (a seeded choice, evaluation inputs)."""
    clouds = recalibration_clouds(train, n_points, True, recalibrate, seed, device) if "recalibrated" in treatments \
        else None
    return per_treatment(model.to(device), check_treatments(treatments), clouds,
                         lambda net: frozen_probe(net, train, test, n_points, k, seed, device))


def verdicts(arms: dict[str, Any]) -> dict[str, Any]:
    """{store: {pretrained arm: {probe: verdict}}}: each pretrained arm's saved figure against the
    random-init arm's strongest BatchNorm treatment (a max over its test figures: a stronger baseline
    only, so a conservative verdict); empty without a random-init arm."""
    if "random_init" not in arms:
        return {}
    baseline = arms["random_init"]["stores"]
    return {store: {arm: {key: verdict({t: f[key] for t, f in r["stores"][store]["bn_treatments"].items()},
                                       {t: f[key] for t, f in baseline[store]["bn_treatments"].items()})
                          for key in PROBE_KEYS}
                    for arm, r in arms.items() if arm != "random_init"}
            for store in baseline}


def mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}


def evaluate_arm(p: StudyParams, model: ReConPretrain, arm: str, data: dict[str, tuple[ClsData, ClsData]],
                 log=print) -> dict[str, Any]:
    from recon.runtime.distributed import pick_device

    device = pick_device(p.device)
    init = InitSource(model.state_dict(), trainstate.jsonable(model.cfg), f"study arm {arm}")
    pp = arm_params(p, arm)
    result: dict[str, Any] = {}
    for name, (train_set, test_set) in data.items():
        treated = frozen_probes(model, train_set, test_set, pp.n_points, p.knn_k, p.seed, device, p.bn_treatments,
                                p.bn_recalibrate)
        r = {**treated["saved"], "bn_treatments": treated}     # the arm's figures: its statistics as saved
        ft = FinetuneParams(**{"device": p.device, **p.finetune})
        accs = [finetune(ft, train_set, test_set, seed, init=init, log=lambda *_: None).metrics["test_acc"]
                for seed in p.finetune_seeds]
        r["finetune"] = mean_std(accs)
        fs = FinetuneParams(**{"device": p.device, **p.fewshot_finetune})
        settings = FewshotSettings(**{**p.fewshot, "seed": p.fewshot.get("seed", p.seed)})   # fewshot.seed wins
        try:
            r["fewshot"] = fewshot_eval(train_set, test_set, settings, fs, init, log=lambda *_: None)
        except ValueError as err:   # too few shapes per class for the episode
            r["fewshot"] = {"skipped": str(err)}
        log(f"study {arm} on {name}: k-NN {r['knn']:.1f}, SVM {r['svm']:.1f} / {r['svm_std']:.1f} standardised, "
            f"fine-tune {r['finetune']['mean']:.1f} ± {r['finetune']['std']:.1f}")
        result[name] = r
    return result


def run_study(p: StudyParams, cache: Path, out: Path, log=print) -> dict[str, Any]:
    """Every arm: pretrain (or not), evaluate on every store; write results, table and plot."""
    out.mkdir(parents=True, exist_ok=True)
    data = {name: (load_classification(path, "train"), load_classification(path, "test"))
            for name, path in p.stores.items()}
    arms = study_arms(p)
    # what decides one arm's figures: everything but the list of arms (and the preset that chose them)
    settings = {k: v for k, v in trainstate.jsonable(p).items() if k not in ("arms", "preset")}
    identity = {"study": settings, "code": trainstate.code_fingerprint(*STUDY_CODE)}
    results: dict[str, Any] = {}
    for arm in arms:
        done = out / arm / "result.json"
        if done.exists() and json.loads(done.read_text()).get("identity") == identity:
            results[arm] = json.loads(done.read_text())
            log(f"study {arm}: reusing {done}")
            continue
        model, history = encoder_for(p, arm, cache, out / arm, log)
        counts = parameter_counts(model)
        log(f"study {arm}: {counts['architecture']} network, {counts['encoder']:,} encoder parameters, "
            f"{counts['pretraining']:,} in pretraining")
        record = {"identity": identity, "params": trainstate.jsonable(arm_params(p, arm)), "parameters": counts,
                  "history": history, "stores": evaluate_arm(p, model, arm, data, log)}
        trainstate.write_json(done, record)
        results[arm] = record
    summary = {"preset": p.preset,
               "arms": {arm: {"stores": r["stores"], "params": r["params"], "parameters": r["parameters"],
                              "history": [{k: v for k, v in h.items() if k == "epoch" or k.startswith(("probe_", "test_loss"))}
                                          for h in r["history"]]} for arm, r in results.items()},
               "verdict": verdicts(results), "bn_treatments": p.bn_treatments,
               "finetune_seeds": p.finetune_seeds, "fewshot": p.fewshot, "stores": p.stores}
    trainstate.write_json(out / "results.json", summary)
    (out / "table.md").write_text(table(summary))
    plot(summary, out / "probe_vs_epochs.png")
    return summary


def _pm(entry: dict | None) -> str:
    if not entry or "mean" not in entry:
        return "–"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}"


def paper_columns(preset: str | None) -> list[str]:
    """The headers of the paper's figures in a preset's table (none without a preset)."""
    return [f"paper ({c}, GPU scale)" for c in PAPER[preset]["columns"]] if preset else []


def paper_cells(preset: str | None, arm: str) -> list[str]:
    """The paper's figures of ``arm`` in ``preset``'s table ("–" where the paper has no such row)."""
    if not preset:
        return []
    figures = PAPER[preset]["arms"].get(arm)
    return list(figures) if figures else ["–"] * len(PAPER[preset]["columns"])


def table(summary: dict) -> str:
    """Markdown: one row per (store, arm), the held-out figures (BatchNorm statistics as saved), with a
    preset the paper's own figures beside them; then the frozen probes per BatchNorm treatment, the
    verdicts and the parameter counts."""
    preset = summary.get("preset")
    paper = paper_columns(preset)
    lines = ["| store | arm | k-NN | SVM raw | SVM std. | few-shot | fine-tune |" + "".join(f" {c} |" for c in paper),
             "|---|---|---|---|---|---|---|" + "---|" * len(paper)]
    stores = list(next(iter(summary["arms"].values()))["stores"]) if summary["arms"] else []
    for store in stores:
        for arm, r in summary["arms"].items():
            s = r["stores"][store]
            fewshot = "; ".join(f"{k} {_pm(v)}" for k, v in s["fewshot"].items() if isinstance(v, dict)) or "–"
            lines.append(f"| {store} | {LABELS.get(arm, arm)} | {s['knn']:.1f} (k={s['knn_k']}) | {s['svm']:.1f} | "
                         f"{s['svm_std']:.1f} | {fewshot} | {_pm(s['finetune'])} |"
                         + "".join(f" {c} |" for c in paper_cells(preset, arm)))
    if preset:
        lines += ["", f"The paper columns are the paper's own figures (ReCon, ICML 2023, {PAPER[preset]['source']}: "
                  f"{PAPER_SCALE}; overall accuracy %, fine-tuned without voting unless the column says zero-shot), "
                  "not ours: a different scale, model size, data and protocol. Read them for the direction of each "
                  "effect, never as a target."]
    lines += ["", "Frozen probes per BatchNorm treatment (saved: as the arm ends; reset: mean 0, variance 1; "
              "recalibrated: on the store's train clouds):", "",
              "| store | arm | BatchNorm | k-NN | SVM raw | SVM std. |", "|---|---|---|---|---|---|"]
    for store in stores:
        for arm, r in summary["arms"].items():
            for t, s in r["stores"][store].get("bn_treatments", {}).items():
                lines.append(f"| {store} | {LABELS.get(arm, arm)} | {t} | {s['knn']:.1f} | {s['svm']:.1f} | "
                             f"{s['svm_std']:.1f} |")
    if summary.get("verdict"):
        lines += ["", "Verdict: the arm as saved minus the strongest random-init treatment (named):", "",
                  "| store | arm | k-NN | SVM raw | SVM std. |", "|---|---|---|---|---|"]
        for store, arms in summary["verdict"].items():
            for arm, v in arms.items():
                cells = " | ".join(f"{v[k]['margin']:+.1f} ({v[k]['random_init_treatment']})" for k in PROBE_KEYS)
                lines.append(f"| {store} | {LABELS.get(arm, arm)} | {cells} |")
    lines += ["", "Parameters per arm (encoder: what the probes read and fine-tuning trains, its head aside; "
              "pretraining: the whole pretraining network):", "",
              "| arm | architecture | encoder | pretraining |", "|---|---|---|---|"]
    for arm, r in summary["arms"].items():
        n = r["parameters"]
        lines.append(f"| {LABELS.get(arm, arm)} | {n['architecture']} | {n['encoder']:,} | {n['pretraining']:,} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Held-out probe (k-NN and standardised SVM on the pretraining test split) vs pretraining epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, title in zip(axes, ("probe_knn", "probe_svm_std"), ("k-NN (k=5)", "linear SVM, standardised")):
        baselines = []   # every arm's monitor has its own random-init twins: (mean, std) over their seeds,
        # of the strongest BatchNorm treatment
        for arm, r in summary["arms"].items():
            rows = [h for h in r["history"] if key in h]
            if rows:
                ax.plot([h["epoch"] + 1 for h in rows], [h[key] for h in rows], marker="o", label=LABELS.get(arm, arm))
                if f"{key}_random_init" in rows[0]:
                    baselines.append((rows[0][f"{key}_random_init"], rows[0].get(f"{key}_random_init_std", 0.0)))
        if baselines:
            means = [m for m, _ in baselines]
            ax.axhspan(min(m - s for m, s in baselines), max(m + s for m, s in baselines), color="grey", alpha=0.2)
            ax.axhline(float(np.mean(means)), color="grey", linestyle="--",
                       label="random init, strongest BatchNorm (mean, band ± std)")
        ax.set_title(f"held-out {title}")
        ax.set_xlabel("pretraining epoch")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
