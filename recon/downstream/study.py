"""The ablation study: does pretraining help, and which part of ReCon does?

Arms (equal budgets: every pretrained arm runs the same ``PretrainParams`` and differs only in the
overrides below): random init (no pretraining), reconstruction only (Point-MAE), distillation only,
full ReCon on raw targets, full ReCon on standardised targets. Each encoder is evaluated on the
held-out (test) split of every downstream store by

- k-NN (cosine, k = 5, or 1 when some class has fewer than 5 train shapes) on the 4C features,
- linear SVM (``LinearSVC(C=0.075)``) on the reference 2C features, raw and train-standardised,
- few-shot: N-way K-shot episodes over folds, a fine-tune per fold (mean ± std over folds),
- fine-tuning from the encoder with several seeds (mean ± std over seeds),

the frozen probes (k-NN, SVM) under every BatchNorm treatment of ``bn_treatments`` for every arm
(:data:`recon.pretraining.probes.BN_TREATMENTS`; the arm's top-level figures are its statistics as
saved, the random-init arm's as initialised), with a verdict per pretrained arm, store and probe:
its saved figure against the random-init arm's strongest treatment (``verdict`` in results.json,
a table in table.md), and, per arm, the monitor's held-out probe after every pretraining epoch (the plot). Results go to
``results.json``, ``table.md`` and ``probe_vs_epochs.png``; an arm's finished results are reused
when the study is run again with the same settings.
"""

from __future__ import annotations

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

#: arm -> PretrainParams overrides (None: no pretraining)
ARMS: dict[str, dict | None] = {
    "random_init": None,
    "rec_only": {"targets": ["rec"]},
    "distill_only": {"targets": ["img", "text"]},
    "recon_raw": {"targets": ["rec", "img", "text"], "target_norm": "none"},
    "recon_std": {"targets": ["rec", "img", "text"], "target_norm": "store"},
    # the released configuration, for reference: raw targets, SmoothL1, no BatchNorm recalibration, the
    # reference architecture (no model overrides such as proj_norm)
    "recon_reference": {"targets": ["rec", "img", "text"], "target_norm": "none", "global_loss": "smooth_l1",
                        "bn_recalibrate": 0, "model": {}},
}
LABELS = {"random_init": "random init", "rec_only": "reconstruction only (Point-MAE)",
          "distill_only": "distillation only", "recon_raw": "ReCon, raw targets",
          "recon_std": "ReCon, standardised targets", "recon_reference": "ReCon, reference settings"}
#: the files whose source decides an arm's result: this module's import closure (a finished arm
#: is reused only while they are unchanged)
STUDY_CODE = codedeps.closure(__name__)


@dataclass
class StudyParams:
    #: the arms to compare: random_init | rec_only | distill_only | recon_raw | recon_std | recon_reference
    arms: list[str] = field(default_factory=lambda: ["random_init", "rec_only", "distill_only", "recon_raw",
                                                     "recon_std"])
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


def arm_params(p: StudyParams, arm: str) -> PretrainParams:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {list(ARMS)}")
    values = {"seed": p.seed, "device": p.device, **p.pretrain, **(ARMS[arm] or {})}
    return PretrainParams(**values)


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
        return head_input(tokens), svm_input(tokens)

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
    identity = {"study": trainstate.jsonable(p), "code": trainstate.code_fingerprint(*STUDY_CODE)}
    results: dict[str, Any] = {}
    for arm in p.arms:
        done = out / arm / "result.json"
        if done.exists() and json.loads(done.read_text()).get("identity") == identity:
            results[arm] = json.loads(done.read_text())
            log(f"study {arm}: reusing {done}")
            continue
        model, history = encoder_for(p, arm, cache, out / arm, log)
        record = {"identity": identity, "params": trainstate.jsonable(arm_params(p, arm)),
                  "history": history, "stores": evaluate_arm(p, model, arm, data, log)}
        trainstate.write_json(done, record)
        results[arm] = record
    summary = {"arms": {arm: {"stores": r["stores"], "params": r["params"],
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


def table(summary: dict) -> str:
    """Markdown: one row per (store, arm), the held-out figures (BatchNorm statistics as saved); then
    the frozen probes per BatchNorm treatment, and the verdicts."""
    lines = ["| store | arm | k-NN | SVM raw | SVM std. | few-shot | fine-tune |", "|---|---|---|---|---|---|---|"]
    stores = list(next(iter(summary["arms"].values()))["stores"]) if summary["arms"] else []
    for store in stores:
        for arm, r in summary["arms"].items():
            s = r["stores"][store]
            fewshot = "; ".join(f"{k} {_pm(v)}" for k, v in s["fewshot"].items() if isinstance(v, dict)) or "–"
            lines.append(f"| {store} | {LABELS.get(arm, arm)} | {s['knn']:.1f} (k={s['knn_k']}) | {s['svm']:.1f} | "
                         f"{s['svm_std']:.1f} | {fewshot} | {_pm(s['finetune'])} |")
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
