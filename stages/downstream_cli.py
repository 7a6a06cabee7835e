"""Typer command functions of the downstream stages, registered in ``cli.py`` with
``app.command("convert")(convert)`` etc. Every option defaults to ``params.yaml`` (the section
named after the stage), then to the stage's built-in default; an option given on the command
line wins.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer


def _run(fn: Callable, *args):
    """Run a stage; expected errors become a one-line message and exit code 1."""
    from pipeline.store import StoreError
    from stages.common import StageError, console

    try:
        return fn(*args)
    except (StageError, StoreError, FileNotFoundError, ValueError, KeyError) as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(1)


def _ints(text: Optional[str]) -> Optional[list[int]]:
    return [int(t) for t in text.replace(",", " ").split()] if text else None


def _words(text: Optional[str]) -> Optional[list[str]]:
    return [t for t in text.replace(",", " ").split()] if text else None


def convert(format: Optional[str] = typer.Argument(None, help="modelnet40 | modelnet10 | pointbert-dat | fewshot-pkl | scanobjectnn | points | shapenetpart | demo-parts [params: convert.format]"),
            source: Optional[Path] = typer.Argument(None, help="dataset root; the cache folder for `points` and `demo-parts` [params: convert.source]"),
            out: Optional[Path] = typer.Option(None, help="output store (a folder for fewshot-pkl) [params: convert.out]"),
            points: Optional[int] = typer.Option(None, help="FPS to this many points, e.g. 1024 or 8192 [params: convert.points]"),
            normals: Optional[bool] = typer.Option(None, "--normals/--no-normals", help="keep normals [params: convert.normals]"),
            variant: Optional[str] = typer.Option(None, help="ScanObjectNN: OBJ_BG | OBJ_ONLY | PB_T50_RS [params: convert.variant]"),
            trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading pickled inputs (.dat, .pkl): pickle runs code, so only for files you trust"),
            shape_names: Optional[Path] = typer.Option(None, help="fewshot-pkl: modelnet40_shape_names.txt to name classes"),
            device: Optional[str] = typer.Option(None, help="where FPS runs: auto | cpu | cuda [params: convert.device]"),
            strict: Optional[bool] = typer.Option(None, "--strict/--no-strict", help="exit non-zero when any shape fails")) -> None:
    """Convert a downstream dataset (or the project's points) into a classification store, or
    ShapeNetPart / the demo's parts into a part-segmentation store."""
    from stages import convert as stage
    from stages.common import load_params

    p = load_params(stage.ConvertParams, "convert", dict(
        format=format, source=str(source) if source else None, out=str(out) if out else None, points=points,
        normals=normals, variant=variant, trust_pickle=trust_pickle or None,
        shape_names=str(shape_names) if shape_names else None, device=device, strict=strict))
    _run(stage.run, p)


def finetune(store: Optional[Path] = typer.Option(None, help="classification store [params: finetune.store]"),
             profile: Optional[str] = typer.Option(None, help="scanobjectnn(-hardest) | scanobjectnn-objbg | scanobjectnn-objonly | modelnet40 | modelnet40-8k | fewshot | demo [params: finetune.profile]"),
             init: Optional[str] = typer.Option(None, help="model.pt / epoch checkpoint / reference .pth / scratch [params: finetune.init]"),
             protocol: Optional[str] = typer.Option(None, help="full | mlp3 | linear [params: finetune.protocol]"),
             epochs: Optional[int] = typer.Option(None, help="[params: finetune.epochs; default: the profile's]"),
             batch_size: Optional[int] = typer.Option(None, help="[params: finetune.batch_size]"),
             lr: Optional[float] = typer.Option(None, help="[params: finetune.lr]"),
             schedule: Optional[str] = typer.Option(None, help="epoch | step [params: finetune.schedule; default: the profile's]"),
             n_points: Optional[int] = typer.Option(None, help="[params: finetune.n_points]"),
             votes: Optional[int] = typer.Option(None, help="voting passes [params: finetune.votes]"),
             val_fraction: Optional[float] = typer.Option(None, help="select the epoch on a validation split carved from train [params: finetune.val_fraction]"),
             seed: Optional[int] = typer.Option(None, help="[params: finetune.seed]"),
             seeds: Optional[str] = typer.Option(None, "--seeds", help="a sweep, e.g. '0,1,2': reports mean ± std [params: finetune.seeds]"),
             device: Optional[str] = typer.Option(None, help="auto | cpu | cuda [params: finetune.device]"),
             max_steps: Optional[int] = typer.Option(None, help="stop after N optimiser steps (smoke test)")) -> None:
    """Fine-tune a classifier on a classification store (torchrun: DDP)."""
    from stages import finetune as stage

    p = stage.params(dict(store=str(store) if store else None, profile=profile, init=init, protocol=protocol,
                          epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, n_points=n_points, votes=votes,
                          val_fraction=val_fraction, seed=seed, seeds=_ints(seeds), device=device,
                          max_steps=max_steps))
    _run(stage.run, p)


def evaluate(tasks: Optional[str] = typer.Option(None, help="comma list of svm, zeroshot, fewshot [params: evaluate.tasks]"),
             checkpoint: Optional[str] = typer.Option(None, help="pretrained model.pt or reference .pth [params: evaluate.checkpoint]"),
             store: Optional[Path] = typer.Option(None, help="classification store [params: evaluate.store]"),
             n_points: Optional[int] = typer.Option(None, help="[params: evaluate.n_points]"),
             text_store: Optional[Path] = typer.Option(None, help="text-teacher store [params: evaluate.text_store]"),
             image_store: Optional[Path] = typer.Option(None, help="image-teacher store [params: evaluate.image_store]"),
             ratio: Optional[float] = typer.Option(None, help="r for the CLIP zero-shot feature [params: evaluate.ratio]"),
             fewshot_folds: Optional[int] = typer.Option(None, help="[params: evaluate.fewshot_folds]"),
             fewshot_dir: Optional[Path] = typer.Option(None, help="converted Point-BERT folds [params: evaluate.fewshot_dir]"),
             baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline", help="also evaluate the checkpoint's network at random init, side by side [params: evaluate.baseline]"),
             out: Optional[Path] = typer.Option(None, "--out", help="folder for metrics.json [params: evaluate.out; default cache/evaluate, the pipeline's own]"),
             device: Optional[str] = typer.Option(None, help="auto | cpu | cuda [params: evaluate.device]")) -> None:
    """Linear SVM, zero-shot and few-shot evaluation of the pretrained encoder."""
    from stages import evaluate as stage
    from stages.common import StageError

    p = stage.params(dict(tasks=_words(tasks), checkpoint=checkpoint, store=str(store) if store else None,
                          n_points=n_points, text_store=str(text_store) if text_store else None,
                          image_store=str(image_store) if image_store else None, ratio=ratio,
                          fewshot_folds=fewshot_folds, fewshot_dir=str(fewshot_dir) if fewshot_dir else None,
                          baseline=baseline, out=str(out) if out else None, device=device))

    def run_by_hand(p: stage.EvaluateParams) -> dict:
        pipeline = stage.params()
        if p.out == pipeline.out and (p.checkpoint, p.store) != (pipeline.checkpoint, pipeline.store):
            raise StageError(f"evaluating {p.checkpoint} on {p.store} would overwrite the pipeline's own "
                             f"metrics (a DVC output): give --out FOLDER")
        return stage.run(p)

    _run(run_by_hand, p)


def export(checkpoint: Optional[Path] = typer.Option(None, help="fine-tuned model.pt [params: export.checkpoint]"),
           onnx: Optional[Path] = typer.Option(None, "--onnx", help="output .onnx file [params: export.onnx]"),
           n_points: Optional[int] = typer.Option(None, help="example input size [params: export.n_points]"),
           check: Optional[bool] = typer.Option(None, "--check/--no-check", help="compare with torch in onnxruntime")) -> None:
    """Export the fine-tuned classifier to ONNX (grouping included) and check it with onnxruntime."""
    from stages import export as stage

    p = stage.params(dict(checkpoint=str(checkpoint) if checkpoint else None, onnx=str(onnx) if onnx else None,
                          n_points=n_points, check=check))
    _run(stage.run, p)
