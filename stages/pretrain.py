"""Stage `pretrain`: train the ReCon student on points + cached teacher targets.

Outputs (``cache/pretrain/``): ``checkpoints/epoch-NNNN.pt`` (the last k), ``model.pt`` (final
weights + config + target statistics) and ``history.csv`` (rewritten every epoch). Git-tracked results
(``cache/metrics/pretrain/``): ``history.csv`` of the finished run (per epoch: losses, lr, samples/s,
and the monitor's figures: losses on fixed train and test shapes next to their mean-target
baselines, the k-NN / SVM probe of the model and of the same network at random init, under every
BatchNorm treatment), ``details.json`` (the last epoch's figures, the probe per feature part and
per BatchNorm treatment, the verdict per probe, the options that decide the targets) and
``metrics.json``, the headline dvc.yaml declares (:data:`HEADLINE`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import layout
from recon.pretraining.trainer import PretrainParams, train
from recon.runtime import trainstate
from stages.common import LossBar, cache_dir, console, metrics_dir, write_metrics
from stages.params import build_params

#: the figures compared across experiments (``metrics.json``), short column name -> details key: the
#: held-out distillation losses over their mean-target baselines, and the held-out k-NN probe of the
#: model (BatchNorm statistics as saved) against the same network at random init: the strongest
#: BatchNorm treatment's mean and std over the baseline seeds (the max over treatments: a conservative
#: baseline). The SVM probes and everything else stay in ``details.json``; few columns with short
#: names keep ``dvc exp show --only-changed`` of a pretraining sweep inside a 160-column terminal.
HEADLINE = {"img_ratio": "test_loss_img_ratio", "text_ratio": "test_loss_text_ratio",
            "knn": "probe_knn", "knn_rand": "probe_knn_random_init", "knn_rand_sd": "probe_knn_random_init_std"}


def headline(details: dict) -> dict:
    """The :data:`HEADLINE` figures of a run's details; a run without the monitor has none of them
    and reports its last training loss instead."""
    found = {short: details[key] for short, key in HEADLINE.items() if isinstance(details.get(key), (int, float))}
    return found or {k: details[k] for k in ("loss",) if isinstance(details.get(k), (int, float))}


def run(p: PretrainParams, cache: Path | None = None, out: Path | None = None) -> dict:
    cache = cache or cache_dir()
    out = out or layout.CacheLayout(cache).stage("pretrain")
    result = train(p, cache, out, progress_factory=LossBar, log=console.print)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    model, history, monitor, stats = result["model"], result["history"], result["monitor"], result["stats"]
    metrics = {k: v for k, v in history[-1].items() if k.startswith(("loss", "train_", "test_", "probe_"))
               or k == "samples_per_s"}
    metrics.update(epochs=len(history), split=p.split, test_shapes_held_out=p.split == "train",
                   target_norm=p.target_norm, image_variants=p.image_variants, global_loss=p.global_loss,
                   data=result["data"])   # the shapes pretrained on: data_fraction's subset (data scaling)
    if stats is not None:
        metrics["target_stats"] = stats.summary()
    if monitor is not None:
        final = monitor.final(model)
        metrics.update(monitor_shapes=final["shapes"], probe=final.get("probe", {}))
        verdicts = final.get("probe", {}).get("verdict", {})
        for key, name in (("knn", "k-NN"), ("svm", "SVM"), ("svm_std", "SVM, standardised")):
            if key in verdicts:
                v = verdicts[key]
                console.print(f"pretrain: held-out {name}: pretrained ({v['pretrained_treatment']} BatchNorm) "
                              f"{v['pretrained']:.1f} % vs the strongest random init ({v['random_init_treatment']}) "
                              f"{v['random_init']:.1f} ± {metrics[f'probe_{key}_random_init_std']:.1f} % "
                              f"({p.baseline_seeds} seed{'s' if p.baseline_seeds > 1 else ''}): {v['margin']:+.1f}")
        for term in ("img", "text"):
            ratio = metrics.get(f"test_loss_{term}_ratio")
            if ratio is not None and ratio > 0.95:
                console.print(f"[yellow]pretrain: test loss_{term} is {ratio:.2f}x the loss of predicting the mean "
                              f"target: nothing shape-specific learned from that teacher yet[/]")
    trainstate.save_atomic(out / "model.pt", {"model": model.state_dict(), "config": trainstate.jsonable(model.cfg),
                                              "categories": result["stores"].categories,
                                              "target_norm": p.target_norm,
                                              "target_stats": stats.state() if stats else None})
    write_metrics(metrics_dir(out) / "metrics.json", metrics, headline(metrics))
    trainstate.write_history(metrics_dir(out), history)
    console.print(f"[green]pretrain: done → {out}, {metrics_dir(out)}[/]", headline(metrics))
    return metrics


def params(overrides: dict | None = None, sets: list[str] | None = None) -> PretrainParams:
    return build_params(PretrainParams, "pretrain", overrides, sets)
