"""The ablation study: does pretraining help, and which part of ReCon does?

Arms (equal budgets: every pretrained arm runs the same ``PretrainParams`` and differs only in the
overrides of :data:`ARMS`): random init (no pretraining), reconstruction only (Point-MAE), distillation
only, full ReCon on raw or standardised targets, and one arm per row of the paper's ablation tables
(targets, Table 4; the distillation metric, Table 5; stop-gradient, Table 6; the vanilla multi-task and
two-tower baselines and the single-modal / cross-modal contrastive-only networks, Table 9; paired vs
unpaired teacher images, Table 14; the cross-modal contrastive network's learning rate, Table 16). A preset (:data:`PRESETS`, ``recon study --preset table4``) picks
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

Data scaling (the paper's Fig. 1(a); ``fractions``, or ``recon study --preset fig1a``): every pretrained arm
pretrains on each fraction of the pretraining shapes (``PretrainParams.data_fraction``: stratified, seeded,
nested) with each of ``fraction_seeds`` (the subset, the initialisation and the probes' seed), random init once
per seed (it does not depend on the fraction); every cell is probed frozen (k-NN, SVM; fine-tuned too with
``scaling_finetune``) and reused like an arm. Results go to ``scaling.json``, ``scaling.md`` and ``scaling.png``
(accuracy against fraction, mean ± std over seeds per arm, random init as a band).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon.downstream.cls_data import ClsData, eval_clouds, load_classification
from recon.downstream.evaluate import (
    FewshotSettings,
    fewshot_eval,
    fewshot_probe,
    recalibration_clouds,
    standardized,
)
from recon.downstream.finetune import finetune
from recon.downstream.recipes import FinetuneParams
from recon.downstream.weights import InitSource
from recon.network.model import ReConPretrain, head_input, svm_input
from recon.pretraining.data import check_fraction, open_pretrain_stores
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
#: a plain Transformer trained by cross-modal distillation alone (the paper's "CMC only", Tables 9 and 16)
CMC_ONLY = {"targets": ["img", "text"], "architecture": "multitask", "stop_grad": False}
#: Table 16's pretraining learning rates (arms ``cmc_lr_<rate>``)
TABLE16_RATES = ("5e-5", "1e-4", "5e-4", "1e-3")
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
    "cmc_only": CMC_ONLY,
    # Table 16: the pretraining learning rate of that cross-modal contrastive model, one rate for the whole
    # network (query_lr_scale 1), the paper's four values
    **{f"cmc_lr_{rate}": {**CMC_ONLY, "lr": float(rate), "query_lr_scale": 1} for rate in TABLE16_RATES},
    # ReCon++ (docs/reconpp.md): one image query per cached view, matched per shape; reconpp also in two stages
    "reconpp_matched": {**RECON, "queries_per_view": True, "match": "hungarian"},
    "reconpp": {**RECON, "queries_per_view": True, "match": "hungarian"},
}
#: arms whose budget is split in two stages as ReCon++ does: reconstruction only for the first half of the
#: shared epochs, the full objective for the rest (the same number of epochs as every arm)
TWO_STAGE_ARMS = ("reconpp",)
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
          "smc_only": "SMC only (plain Transformer)", "cmc_only": "CMC only (plain Transformer)",
          **{f"cmc_lr_{rate}": f"CMC only, learning rate {rate}" for rate in TABLE16_RATES},
          "reconpp_matched": "ReCon++ queries: one per view, Hungarian-matched",
          "reconpp": "ReCon++: matched queries + reconstruction-first stage"}

#: preset -> the arms of one of the paper's ablation tables (``recon study --preset``), random init first
PRESETS: dict[str, list[str]] = {
    "table4": ["random_init", "targets_rec", "targets_rec_img", "targets_rec_text", "targets_all", "targets_smc"],
    "table5": ["random_init", "metric_smooth_l1", "metric_l2", "metric_cosine", "metric_infonce"],
    "table6": ["random_init", "stopgrad_on", "stopgrad_off"],
    "table9": ["random_init", "smc_only", "cmc_only", "targets_rec", "multitask", "two_tower", "targets_smc",
               "targets_all"],
    "table14": ["random_init", "images_paired", "images_unpaired"],
    "table16": ["random_init", *(f"cmc_lr_{rate}" for rate in TABLE16_RATES)],
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
    "table16": {"source": "Table 16 (pretraining learning rate, cross-modal contrastive, no reconstruction)",
                "columns": ["ScanObjectNN PB_T50_RS", "ModelNet40"],
                "arms": {"cmc_lr_5e-5": ["85.11", "92.1"], "cmc_lr_1e-4": ["86.49", "92.4"],
                         "cmc_lr_5e-4": ["82.48", "90.3"], "cmc_lr_1e-3": ["67.45", "86.3"]}},
}
#: data-scaling presets (``recon study --preset fig1a``): the arms, pretraining fractions and seeds of one of the
#: paper's scaling figures. Fig. 1(a) compares generative (masked point modelling: ``targets_rec``), contrastive
#: and ReCon pretraining; its contrastive curve is a plain Transformer trained by cross-modal distillation alone,
#: ``cmc_only`` (``distill_only`` would keep ReCon's stop-gradient with no reconstruction: its patch tokens would
#: get no gradient at all and stay at initialisation, not a contrastive model).
SCALING_PRESETS: dict[str, dict] = {
    "fig1a": {"arms": ["random_init", "targets_rec", "cmc_only", "targets_all"],
              "fractions": [0.01, 0.05, 0.1, 0.25, 0.5, 1.0], "fraction_seeds": [0, 1, 2]},
}
#: the paper's own reading of a scaling figure (PAPER_RESULTS.md: "plots, no table"): printed beside ours
PAPER_FIGURES: dict[str, dict] = {
    "fig1a": {"source": "Figure 1(a) (data efficiency: ScanObjectNN PB_T50_RS fine-tuning accuracy against the "
                        "fraction of ShapeNet used for pretraining, 1 % to 100 %; a plot, no table of numbers)",
              "reading": "contrastive models over-fit at low data (\"representation over-fitting\") but scale better; "
                         "generative models improve little with more data (\"data filling\"); vanilla multi-task lands "
                         "below the generative baseline; ReCon is above all at every ratio."},
}
#: the study settings that pick the grid of cells, not what one cell computes (never part of a result's identity)
GRID_KEYS = ("arms", "preset", "fractions", "fraction_seeds")
#: the files whose source decides an arm's result: this module's import closure (a finished arm
#: is reused only while they are unchanged)
STUDY_CODE = codedeps.closure(__name__)


@dataclass
class StudyParams:
    #: the arms to compare (recon.downstream.study.ARMS): random_init | rec_only | distill_only | recon_raw |
    #: recon_std | recon_reference | targets_* | metric_* | stopgrad_* | images_* | multitask | two_tower | ...
    arms: list[str] = field(default_factory=lambda: ["random_init", "rec_only", "distill_only", "recon_raw",
                                                     "recon_std"])
    #: table4 | table5 | table6 | table9 | table14 | table16: the arms of that paper table (instead of arms), and the
    #: paper's own figures beside ours in table.md; fig1a: data scaling (its arms, fractions and seeds); null: arms
    preset: str | None = None
    #: data scaling (Fig. 1(a)): pretraining fractions in (0, 1] every arm runs at, with every fraction seed
    #: (scaling.json/.md/.png instead of the ablation table); []: no scaling
    fractions: list[float] = field(default_factory=list)
    fraction_seeds: list[int] = field(default_factory=lambda: [0])   # each (arm, fraction)'s seeds: subset, init, probes
    scaling_finetune: bool = False                    # scaling cells fine-tune too (finetune_seeds); else probes only
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
    if p.preset is not None and p.preset not in PRESETS and p.preset not in SCALING_PRESETS:
        raise ValueError(f"unknown preset {p.preset!r}; choose from {list(PRESETS) + list(SCALING_PRESETS)}")
    arms = (SCALING_PRESETS[p.preset]["arms"] if p.preset in SCALING_PRESETS else PRESETS[p.preset]) if p.preset \
        else p.arms
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    return list(arms)


def arm_params(p: StudyParams, arm: str) -> PretrainParams:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {list(ARMS)}")
    values = {"seed": p.seed, "device": p.device, **copy.deepcopy(p.pretrain), **copy.deepcopy(ARMS[arm] or {})}
    if arm in TWO_STAGE_ARMS:
        total = int(values.get("epochs", PretrainParams.epochs))
        values.update(rec_epochs=total // 2, epochs=total - total // 2)
    return PretrainParams(**values)


def parameter_counts(model: ReConPretrain) -> dict[str, Any]:
    """Parameters of the arm's network: ``encoder`` (what the probes read and fine-tuning trains, its
    head aside) and ``pretraining`` (with the decoder, rebuild head and projections), and its architecture."""
    return {"architecture": model.cfg.architecture, "encoder": sum(t.numel() for t in model.encoder.parameters()),
            "pretraining": sum(t.numel() for t in model.parameters())}


def encoder_for(p: StudyParams, arm: str, cache: Path, out: Path, log=print) -> tuple[ReConPretrain, list[dict]]:
    """The arm's encoder (pretrained, or its random init) and its pretraining history."""
    model, history, _ = arm_encoder(p, arm, cache, out, log)
    return model, history


def arm_encoder(p: StudyParams, arm: str, cache: Path, out: Path,
                log=print) -> tuple[ReConPretrain, list[dict], dict | None]:
    """:func:`encoder_for`, and the shapes it pretrained on (the trainer's ``data``; None at random init)."""
    pp = arm_params(p, arm)
    if ARMS[arm] is not None:
        result = train(pp, cache, out / "pretrain", log=log)
        return result["model"].eval(), result["history"], result["data"]
    # random init: exactly the starting point of every pretrained arm (same seed, same config), its BatchNorm
    # statistics as initialised; the frozen probes measure it under every treatment (evaluate_arm)
    stores = open_pretrain_stores(cache, "img" in pp.targets, "text" in pp.targets)
    torch.manual_seed(pp.seed)
    model = build_model(pp, stores.image_dim, stores.text_dim)
    return model.eval(), [], None


@torch.no_grad()
def frozen_probe(model: ReConPretrain, train: ClsData, test: ClsData, n_points: int, k: int, seed: int,
                 device, fewshot: FewshotSettings | None = None) -> dict[str, Any]:
    """k-NN on the 4C features and the linear SVM (raw, standardised) on the 2C features, in %; with
    ``fewshot`` also the few-shot probe on the same 2C features (:func:`fewshot_probe`: a linear SVM per
    episode; ``fsp`` is its mean over every setting, raw features), unless the store is too small for
    the episodes. The probe needs no training, so random init is measured as it is, not by how far a
    short fine-tune moves it (the fine-tuned few-shot left it at chance)."""
    model.eval().to(device)

    def both(x):
        tokens = model.encode(x)
        return head_input(tokens, model.cfg.img_queries), svm_input(tokens, model.cfg.img_queries)

    (knn_tr, svm_tr), (knn_te, svm_te) = (batched(both, eval_clouds(d, n_points, True, device), 64, device)
                                          for d in (train, test))
    k = k if np.bincount(train.labels).min() >= k else 1
    svm_tr_std, svm_te_std = standardized(svm_tr, svm_te)
    found = {"knn": 100 * knn_probe(knn_tr, train.labels, knn_te, test.labels, k), "knn_k": k,
             "svm": svm_accuracy(svm_tr, train.labels, svm_te, test.labels, seed=seed)[1],
             "svm_std": svm_accuracy(svm_tr_std, train.labels, svm_te_std, test.labels, seed=seed)[1]}
    if fewshot is not None:
        try:
            found["fewshot_probe"] = fewshot_probe({"train": svm_tr, "test": svm_te}, train, test, fewshot)
            found[FEWSHOT_PROBE_KEY] = float(np.mean([r["mean"] for r in found["fewshot_probe"].values()]))
        except ValueError:   # too few shapes per class for the episodes: the fine-tuned few-shot says why
            pass
    return found


PROBE_KEYS = ("knn", "svm", "svm_std")
#: the few-shot probe's figure, beside :data:`PROBE_KEYS` where the study runs few-shot and the store allows it
FEWSHOT_PROBE_KEY = "fsp"


def probe_keys(*figures: dict) -> list[str]:
    """:data:`PROBE_KEYS`, and the few-shot probe's where every one of ``figures`` has it."""
    return [*PROBE_KEYS, *([FEWSHOT_PROBE_KEY] if all(FEWSHOT_PROBE_KEY in f for f in figures) else [])]


def frozen_probes(model: ReConPretrain, train: ClsData, test: ClsData, n_points: int, k: int, seed: int, device,
                  treatments: list[str], recalibrate: int, fewshot: FewshotSettings | None = None
                  ) -> dict[str, dict[str, Any]]:
    """:func:`frozen_probe` under every BatchNorm treatment ({treatment: probe}); ``recalibrated``
    re-estimates the statistics on ``recalibrate`` train clouds (a seeded choice, evaluation inputs)."""
    clouds = recalibration_clouds(train, n_points, True, recalibrate, seed, device) if "recalibrated" in treatments \
        else None
    return per_treatment(model.to(device), check_treatments(treatments), clouds,
                         lambda net: frozen_probe(net, train, test, n_points, k, seed, device, fewshot))


def verdicts(arms: dict[str, Any]) -> dict[str, Any]:
    """{store: {pretrained arm: {probe: verdict}}}: each pretrained arm's saved figure against the
    random-init arm's strongest BatchNorm treatment (a max over its test figures: a stronger baseline
    only, so a conservative verdict); empty without a random-init arm."""
    if "random_init" not in arms:
        return {}
    baseline = arms["random_init"]["stores"]
    return {store: {arm: {key: verdict({t: f[key] for t, f in r["stores"][store]["bn_treatments"].items()},
                                       {t: f[key] for t, f in baseline[store]["bn_treatments"].items()})
                          for key in probe_keys(*r["stores"][store]["bn_treatments"].values(),
                                                *baseline[store]["bn_treatments"].values())}
                    for arm, r in arms.items() if arm != "random_init"}
            for store in baseline}


def mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": [float(v) for v in values]}


def evaluate_arm(p: StudyParams, model: ReConPretrain, arm: str, data: dict[str, tuple[ClsData, ClsData]],
                 log=print, finetuned: bool = True, fewshot: bool = True) -> dict[str, Any]:
    """The frozen probes under every BatchNorm treatment, then (unless switched off) the fine-tunes over
    ``finetune_seeds`` and the few-shot episodes, per store."""
    from recon.runtime.distributed import pick_device

    device = pick_device(p.device)
    init = InitSource(model.state_dict(), trainstate.jsonable(model.cfg), f"study arm {arm}")
    pp = arm_params(p, arm)
    # the episodes of the few-shot fine-tunes, which the frozen few-shot probe reads too
    settings = FewshotSettings(**{**p.fewshot, "seed": p.fewshot.get("seed", p.seed)}) if fewshot else None
    result: dict[str, Any] = {}
    for name, (train_set, test_set) in data.items():
        treated = frozen_probes(model, train_set, test_set, pp.n_points, p.knn_k, p.seed, device, p.bn_treatments,
                                p.bn_recalibrate, settings)
        r = {**treated["saved"], "bn_treatments": treated}     # the arm's figures: its statistics as saved
        if finetuned:
            ft = FinetuneParams(**{"device": p.device, **p.finetune})
            accs = [finetune(ft, train_set, test_set, seed, init=init, log=lambda *_: None).metrics["test_acc"]
                    for seed in p.finetune_seeds]
            r["finetune"] = mean_std(accs)
        if fewshot:
            fs = FinetuneParams(**{"device": p.device, **p.fewshot_finetune})
            try:
                r["fewshot"] = fewshot_eval(train_set, test_set, settings, fs, init, log=lambda *_: None)
            except ValueError as err:   # too few shapes per class for the episode
                r["fewshot"] = {"skipped": str(err)}
        log(f"study {arm} on {name}: k-NN {r['knn']:.1f}, SVM {r['svm']:.1f} / {r['svm_std']:.1f} standardised"
            + (f", few-shot probe {r[FEWSHOT_PROBE_KEY]:.1f}" if FEWSHOT_PROBE_KEY in r else "")
            + (f", fine-tune {r['finetune']['mean']:.1f} ± {r['finetune']['std']:.1f}" if finetuned else ""))
        result[name] = r
    return result


def finished(done: Path, identity: dict) -> dict | None:
    """The result an arm or a scaling cell saved at ``done``, if it was computed with ``identity``; else None."""
    if not done.exists():
        return None
    record = json.loads(done.read_text())
    return record if record.get("identity") == identity else None


def run_study(p: StudyParams, cache: Path, out: Path, log=print) -> dict[str, Any]:
    """Every arm: pretrain (or not), evaluate on every store; write results, table and plot."""
    arms = study_arms(p)
    fractions, seeds = scaling_grid(p)
    out.mkdir(parents=True, exist_ok=True)
    data = {name: (load_classification(path, "train"), load_classification(path, "test"))
            for name, path in p.stores.items()}
    if fractions:
        return run_scaling(p, arms, fractions, seeds, data, cache, out, log)
    # what decides one arm's figures: everything but the list of arms (and the preset that chose them)
    settings = {k: v for k, v in trainstate.jsonable(p).items() if k not in (*GRID_KEYS, "scaling_finetune")}
    identity = {"study": settings, "code": trainstate.code_fingerprint(*STUDY_CODE)}
    results: dict[str, Any] = {}
    for arm in arms:
        done = out / arm / "result.json"
        if (saved := finished(done, identity)) is not None:
            results[arm] = saved
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


def _figure(figures: dict, key: str) -> str:
    return f"{figures[key]:.1f}" if key in figures else "–"


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
    lines = ["| store | arm | k-NN | SVM raw | SVM std. | few-shot probe | few-shot | fine-tune |"
             + "".join(f" {c} |" for c in paper), "|---|---|---|---|---|---|---|---|" + "---|" * len(paper)]
    stores = list(next(iter(summary["arms"].values()))["stores"]) if summary["arms"] else []
    for store in stores:
        for arm, r in summary["arms"].items():
            s = r["stores"][store]
            fewshot = "; ".join(f"{k} {_pm(v)}" for k, v in s["fewshot"].items() if isinstance(v, dict)) or "–"
            lines.append(f"| {store} | {LABELS.get(arm, arm)} | {s['knn']:.1f} (k={s['knn_k']}) | {s['svm']:.1f} | "
                         f"{s['svm_std']:.1f} | {_figure(s, FEWSHOT_PROBE_KEY)} | {fewshot} | {_pm(s['finetune'])} |"
                         + "".join(f" {c} |" for c in paper_cells(preset, arm)))
    if preset:
        lines += ["", f"The paper columns are the paper's own figures (ReCon, ICML 2023, {PAPER[preset]['source']}: "
                  f"{PAPER_SCALE}; overall accuracy %, fine-tuned without voting unless the column says zero-shot), "
                  "not ours: a different scale, model size, data and protocol. Read them for the direction of each "
                  "effect, never as a target."]
    lines += ["", "Frozen probes per BatchNorm treatment (saved: as the arm ends; reset: mean 0, variance 1; "
              "recalibrated: on the store's train clouds):", "",
              "| store | arm | BatchNorm | k-NN | SVM raw | SVM std. | few-shot probe |",
              "|---|---|---|---|---|---|---|"]
    for store in stores:
        for arm, r in summary["arms"].items():
            for t, s in r["stores"][store].get("bn_treatments", {}).items():
                lines.append(f"| {store} | {LABELS.get(arm, arm)} | {t} | {s['knn']:.1f} | {s['svm']:.1f} | "
                             f"{s['svm_std']:.1f} | {_figure(s, FEWSHOT_PROBE_KEY)} |")
    if summary.get("verdict"):
        lines += ["", "Verdict: the arm as saved minus the strongest random-init treatment (named):", "",
                  "| store | arm | k-NN | SVM raw | SVM std. | few-shot probe |", "|---|---|---|---|---|---|"]
        for store, arms in summary["verdict"].items():
            for arm, v in arms.items():
                cells = " | ".join(f"{v[k]['margin']:+.1f} ({v[k]['random_init_treatment']})" if k in v else "–"
                                   for k in (*PROBE_KEYS, FEWSHOT_PROBE_KEY))
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


# ----------------------------------------------------------------------------- data scaling (Fig. 1(a))


def scaling_grid(p: StudyParams) -> tuple[list[float], list[int]]:
    """The data-scaling grid: (fractions, seeds) of a scaling preset (:data:`SCALING_PRESETS`) or of
    ``p.fractions`` / ``p.fraction_seeds``; ([], ...) when the study is no scaling study. Refuses a
    fraction outside (0, 1], repeated fractions or seeds, and a scaling study without seeds."""
    grid = SCALING_PRESETS.get(p.preset or "", {"fractions": p.fractions, "fraction_seeds": p.fraction_seeds})
    fractions = [check_fraction(f) for f in grid["fractions"]]
    seeds = [int(s) for s in grid["fraction_seeds"]]
    if len(set(fractions)) != len(fractions) or len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated fractions or fraction_seeds: {fractions}, {seeds}")
    if fractions and not seeds:
        raise ValueError("a scaling study (fractions) needs at least one of fraction_seeds")
    return sorted(fractions), seeds


def cell_params(p: StudyParams, arm: str, fraction: float, seed: int) -> StudyParams:
    """The study's settings for one cell: ``seed`` everywhere (pretraining and its subset unless
    ``pretrain.data_seed`` pins it, the probes), the arm pretrains on ``fraction`` of its shapes (the
    random-init arm, which pretrains on nothing, at 1: one cell per seed whatever the fractions)."""
    pretrain = {**p.pretrain, "seed": seed, "data_fraction": 1.0 if ARMS[arm] is None else fraction}
    return dataclasses.replace(p, seed=seed, pretrain=pretrain, arms=[arm], preset=None, fractions=[fraction],
                               fraction_seeds=[seed])


def cell_dir(out: Path, arm: str, fraction: float, seed: int) -> Path:
    """A cell's folder: ``<arm>/fraction-<f>/seed-<s>`` (random init: ``random_init/seed-<s>``)."""
    return out / arm / f"seed-{seed}" if ARMS[arm] is None else out / arm / f"fraction-{fraction:g}" / f"seed-{seed}"


def run_scaling(p: StudyParams, arms: list[str], fractions: list[float], seeds: list[int],
                data: dict[str, tuple[ClsData, ClsData]], cache: Path, out: Path, log=print) -> dict[str, Any]:
    """Every (arm, fraction, seed) cell (random init: every seed, once): pretrain on the fraction, probe
    frozen (and fine-tune with ``scaling_finetune``); a finished cell is reused while its identity (the
    cell's settings: fraction and seed included, the study's code) is unchanged. Writes scaling.json,
    scaling.md and scaling.png."""
    code = trainstate.code_fingerprint(*STUDY_CODE)
    # what a cell does not run is no part of its identity: few-shot never, the fine-tunes unless scaling_finetune
    unused = (*GRID_KEYS, "fewshot", "fewshot_finetune",
              *(() if p.scaling_finetune else ("finetune", "finetune_seeds")))
    cells = []
    for arm in arms:
        for fraction in [1.0] if ARMS[arm] is None else fractions:
            for seed in seeds:
                cp = cell_params(p, arm, fraction, seed)
                folder = cell_dir(out, arm, fraction, seed)
                done = folder / "result.json"
                identity = {"study": {k: v for k, v in trainstate.jsonable(cp).items() if k not in unused},
                            "cell": {"arm": arm, "fraction": None if ARMS[arm] is None else fraction, "seed": seed},
                            "code": code}
                name = f"{arm}" + ("" if ARMS[arm] is None else f" at {fraction:g}") + f", seed {seed}"
                if (saved := finished(done, identity)) is not None:
                    cells.append(saved)
                    log(f"study {name}: reusing {done}")
                    continue
                model, history, shapes = arm_encoder(cp, arm, cache, folder, log)
                record = {"identity": identity, **identity["cell"], "data": shapes,
                          "params": trainstate.jsonable(arm_params(cp, arm)), "parameters": parameter_counts(model),
                          "history": history,
                          "stores": evaluate_arm(cp, model, arm, data, log, finetuned=p.scaling_finetune,
                                                 fewshot=False)}
                trainstate.write_json(done, record)
                cells.append(record)
    summary = scaling_summary(p, arms, fractions, seeds, cells)
    summary["plot"] = scaling_plot(summary, out / "scaling.png")    # each panel's lines
    trainstate.write_json(out / "scaling.json", summary)
    (out / "scaling.md").write_text(scaling_table(summary))
    return summary


def scaling_metrics(p: StudyParams) -> list[str]:
    """The held-out figures of a scaling cell: the frozen probes (BatchNorm statistics as saved), the
    fine-tunes' mean when they run."""
    return [*PROBE_KEYS, *(["finetune"] if p.scaling_finetune else [])]


def scaling_summary(p: StudyParams, arms: list[str], fractions: list[float], seeds: list[int],
                    cells: list[dict]) -> dict[str, Any]:
    """scaling.json: every cell (arm, fraction, seed, the shapes it pretrained on, its held-out figures),
    and what the plot draws: per store and figure, each pretrained arm's mean ± std over seeds at every
    fraction (``series``), random init's over its seeds (``random_init``)."""
    metrics = scaling_metrics(p)

    def figure(cell: dict, store: str, metric: str) -> float:
        value = cell["stores"][store][metric]
        return value["mean"] if isinstance(value, dict) else value

    rows = [{"arm": c["arm"], "fraction": c["fraction"], "seed": c["seed"],
             **({k: c["data"][k] for k in ("shapes", "of", "per_category")} if c.get("data") else {}),
             "stores": {s: {m: figure(c, s, m) for m in metrics} for s in p.stores}} for c in cells]
    series: dict[str, dict] = {s: {m: {} for m in metrics} for s in p.stores}
    baseline: dict[str, dict] = {s: {} for s in p.stores}
    for store in p.stores:
        for metric in metrics:
            for arm in arms:
                mine = [r for r in rows if r["arm"] == arm]
                if ARMS[arm] is None:
                    baseline[store][metric] = mean_std([r["stores"][store][metric] for r in mine])
                    continue
                per = [[r["stores"][store][metric] for r in mine if r["fraction"] == f] for f in fractions]
                series[store][metric][arm] = {"fractions": fractions, "mean": [float(np.mean(v)) for v in per],
                                              "std": [float(np.std(v)) for v in per], "values": per}
    shapes = {f"{f:g}": next((r["shapes"] for r in rows if r["fraction"] == f and "shapes" in r), None)
              for f in fractions}
    return {"preset": p.preset, "arms": arms, "fractions": fractions, "seeds": seeds, "metrics": metrics,
            "stores": p.stores, "shapes": shapes, "cells": rows, "series": series, "random_init": baseline,
            "paper": PAPER_FIGURES.get(p.preset or "")}


METRIC_LABELS = {"knn": "k-NN", "svm": "linear SVM", "svm_std": "linear SVM, standardised",
                 "finetune": "fine-tuned"}


def scaling_table(summary: dict) -> str:
    """Markdown: per store and figure, one row per arm, mean ± std over seeds at every fraction."""
    fractions = summary["fractions"]
    head = "| store | figure | arm |" + "".join(f" {100 * f:g} % |" for f in fractions)
    lines = [head, "|---|---|---|" + "---|" * len(fractions),
             "| | | pretraining shapes |" + "".join(f" {summary['shapes'][f'{f:g}']} |" for f in fractions)]
    for store, figures in summary["series"].items():
        for metric, arms in figures.items():
            if metric in summary["random_init"][store]:
                cells = _pm(summary["random_init"][store][metric]) + " (no pretraining)"
                lines.append(f"| {store} | {METRIC_LABELS[metric]} | {LABELS['random_init']} | {cells} |"
                             + " |" * (len(fractions) - 1))
            for arm, s in arms.items():
                lines.append(f"| {store} | {METRIC_LABELS[metric]} | {LABELS.get(arm, arm)} |"
                             + "".join(f" {m:.1f} ± {d:.1f} |" for m, d in zip(s["mean"], s["std"])))
    lines += ["", f"Held-out accuracy (%), mean ± std over seeds {summary['seeds']} (each seed: the pretraining "
              "subset, the initialisation and the probes); the frozen probes with BatchNorm statistics as saved. "
              "Pretraining shapes: per category max(1, round(fraction · n)) of the pretraining split."]
    if summary.get("paper"):
        lines += ["", f"The paper ({summary['paper']['source']}; {PAPER_SCALE}) reads: {summary['paper']['reading']} "
                  "Its figure has no numbers to print beside ours; ours come from a tiny student on the demo's "
                  "shapes: compare the direction of each curve, never the values."]
    return "\n".join(lines) + "\n"


def scaling_plot(summary: dict, path: Path) -> dict[str, list[str]]:
    """Held-out accuracy against the pretraining fraction (log x): per store (rows) and figure (columns),
    one line per pretrained arm (mean over seeds, shaded ± std), random init as a dashed line with a
    ± std band. Returns each panel's line labels ({"store/figure": [label, ...]})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stores, metrics, fractions = list(summary["series"]), summary["metrics"], summary["fractions"]
    fig, axes = plt.subplots(len(stores), len(metrics), figsize=(4.2 * len(metrics), 3.6 * len(stores)),
                             squeeze=False)
    drawn: dict[str, list[str]] = {}
    for row, store in enumerate(stores):
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for arm, s in summary["series"][store][metric].items():
                mean, std = np.array(s["mean"]), np.array(s["std"])
                (line,) = ax.plot(fractions, mean, marker="o", label=LABELS.get(arm, arm))
                ax.fill_between(fractions, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            base = summary["random_init"][store].get(metric)
            if base:
                ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="grey", alpha=0.15)
                ax.axhline(base["mean"], color="grey", linestyle="--", label=f"{LABELS['random_init']} (± std)")
            ax.set_xscale("log")
            ax.set_xticks(fractions)
            ax.set_xticklabels([f"{100 * f:g}%" for f in fractions], fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{store}: held-out {METRIC_LABELS[metric]}", fontsize=9)
            ax.set_xlabel("pretraining data (fraction of shapes)")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            drawn[f"{store}/{metric}"] = [line.get_label() for line in ax.get_lines()]
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"data scaling: mean ± std over seeds {summary['seeds']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn
