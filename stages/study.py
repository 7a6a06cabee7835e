"""Stage `study` (not part of `dvc repro`: it takes tens of minutes): the ablation study of
recon/downstream/study.py on the demo cache, evaluated on the held-out splits of the demo's downstream store
and of ModelNet40 files when given (``modelnet40_root``, converted once into the study folder).

Every arm pretrains with the ``pretrain`` section of params.yaml (the demo's budget) plus
``study.pretrain``; ``quick`` shrinks everything to a smoke run (the tests use it). ``preset`` (table4 |
table5 | table6 | table9 | table14 | table16) runs the arms of that paper table into ``<out>/<preset>``, its
table.md with the paper's figures beside ours (docs/studies.md). ``fractions`` (or the preset ``fig1a``) makes it
a data-scaling study: every arm at every pretraining fraction and seed, scaling.{json,md,png} instead of the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline import layout
from recon.downstream.study import FEWSHOT_PROBE_KEY, PROBE_KEYS, StudyParams, run_study, scaling_grid
from recon.pretraining.trainer import PretrainParams
from recon.runtime import trainstate
from stages.common import StageError, cache_dir, check_headline, console, metrics_dir, publish, write_metrics
from stages.params import build_params

#: a smoke run: a few steps of a small student, one fine-tune epoch, one few-shot fold
SMALL = {"n_points": 256, "num_group": 16, "group_size": 16}
QUICK = {"pretrain": {"model": {"trans_dim": 48, "depth": 2, "decoder_depth": 1, "num_heads": 3, "decoder_num_heads": 3,
                                "num_group": 16, "group_size": 16},
                      "epochs": 2, "batch_size": 8, "n_points": 256, "warmup_epochs": 1, "monitor_shapes": 64,
                      "bn_recalibrate": 16, "keep_last": 1},
         "finetune": {"profile": "demo", "votes": 0, "epochs": 1, "warmup_epochs": 0, "batch_size": 8, **SMALL},
         "fewshot": {"ways": [2], "shots": [2], "folds": 2, "query": 1},
         "fewshot_finetune": {"profile": "demo", "votes": 0, "epochs": 1, "warmup_epochs": 0, "batch_size": 4, **SMALL},
         "finetune_seeds": [0, 1]}


@dataclass
class StudyStageParams(StudyParams):
    out: str = layout.default("study")      # output folder (table.md, plot, per-arm runs); a preset: its subfolder
    demo_store: str = layout.default(layout.DEMO_STORE)  # the demo's classification store (held out: its test split)
    modelnet40_root: str | None = None      # modelnet40_normal_resampled files, converted once (test split held out)
    modelnet40_points: int = 1024           # points per converted ModelNet40 shape
    quick: bool = False                     # a smoke run: tiny student, a few steps (default out: cache/study/quick)


def params(overrides: dict | None = None, sets: list[str] | None = None) -> StudyStageParams:
    return build_params(StudyStageParams, "study", overrides, sets)


def study_params(p: StudyStageParams, stores: dict[str, str]) -> StudyParams:
    """The library's params: every arm's pretraining = params.yaml ``pretrain`` + ``study.pretrain``."""
    pretrain = dataclasses.asdict(build_params(PretrainParams, "pretrain"))
    values = {f.name: getattr(p, f.name) for f in dataclasses.fields(StudyParams)}
    values.update(pretrain={**pretrain, **p.pretrain}, stores=stores)
    if p.quick:   # the smoke run's small student and budget; what study.pretrain sets still wins
        values.update({k: v for k, v in QUICK.items() if k != "pretrain"})
        values["pretrain"] = {**pretrain, **QUICK["pretrain"], **p.pretrain}
    return StudyParams(**values)


def run(p: StudyStageParams, cache: Path | None = None) -> dict:
    cache = cache or cache_dir()
    out = Path(p.out)
    if p.quick and p.out == StudyStageParams.out:   # a smoke run never replaces the real study's table
        out = out / "quick"
    converted = out                                  # ModelNet40 files, converted once for every preset
    if p.preset:                                     # each paper table in a folder of its own
        out = out / p.preset
    stores = dict(p.stores) or {}
    if not stores:
        if not Path(p.demo_store).exists():
            raise StageError(f"{p.demo_store} not found: run `recon convert` (or `dvc repro convert`) first")
        stores["demo"] = p.demo_store
        if p.modelnet40_root:
            if not Path(p.modelnet40_root).is_dir():
                raise StageError(f"modelnet40_root {p.modelnet40_root} is not a folder")
            from pipeline.convert import convert_modelnet
            from recon.network.pointops import fps_indices
            store = converted / f"modelnet40-{p.modelnet40_points}.zarr"
            convert_modelnet(p.modelnet40_root, store, p.modelnet40_points, fps=fps_indices, log=console.print)
            stores["modelnet40"] = str(store)
    sp = study_params(p, stores)
    summary = run_study(sp, cache, out, log=console.print)
    table, figure = ("scaling.md", "scaling.png") if scaling_grid(sp)[0] else ("table.md", "probe_vs_epochs.png")
    # the study's own folder (DVC's `dvc exp run stages/studies/dvc.yaml`): its headline, details, table and
    # plot git-tracked in cache/metrics/study, so each experiment carries what it ran; another --out: the
    # headline beside its table
    figures = headline(summary, p.quick)
    if p.out == StudyStageParams.out:
        results = metrics_dir(Path(StudyStageParams.out))
        write_metrics(results / "metrics.json", summary, figures)
        publish(out / table, results / "table.md")
        publish(out / figure, results / "plot.png")
    else:
        results = out
        trainstate.write_json(results / "metrics.json", check_headline(figures))
    console.print(f"[green]study: done → {out / table}, {out / figure}; headline {results / 'metrics.json'}[/]")
    console.print((out / table).read_text())
    return summary


def headline(summary: dict, quick: bool = False) -> dict:
    """The flat numbers experiments are compared by (``metrics.json``, read by name with `dvc metrics
    show/diff`; everything else in details.json), per store and arm (``demo.targets_all.knn``): the frozen
    probes with the statistics as saved (``knn``, ``svm``, ``svm_std``, the few-shot probe ``fsp``), the
    fine-tunes' mean and std (``ft``, ``ft_sd``). A scaling study: per store, arm and fraction
    (``demo.targets_all.p25.knn`` for 25 %) each figure's mean over the seeds, random init's without a
    fraction. ``quick``: 1 for a smoke run."""
    found: dict = {"quick": int(quick)}
    if "series" in summary:                          # data scaling
        for store, figures in summary["series"].items():
            for metric, arms in figures.items():
                for arm, line in arms.items():
                    found.update({f"{store}.{arm}.p{100 * f:g}.{metric}": m
                                  for f, m in zip(line["fractions"], line["mean"])})
            found.update({f"{store}.random_init.{metric}": v["mean"]
                          for metric, v in summary["random_init"][store].items()})
        return found
    for arm, record in summary["arms"].items():
        for store, r in record["stores"].items():
            finetuned = r.get("finetune") or {}
            figures = {key: r.get(key) for key in (*PROBE_KEYS, FEWSHOT_PROBE_KEY)}
            figures.update(ft=finetuned.get("mean"), ft_sd=finetuned.get("std"))
            found.update({f"{store}.{arm}.{k}": v for k, v in figures.items() if isinstance(v, (int, float))})
    return found
