"""`recon`: one thin command per pipeline stage.

Every option defaults to ``params.yaml`` (the section named after the stage), then to the
stage's built-in default; an option given on the command line wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

app = typer.Typer(help="ReCon point-cloud pretraining with an offline teacher-feature cache.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)

WORKERS = typer.Option(None, "--workers", "-j", help="worker processes [params: workers]")
LIMIT = typer.Option(None, "--limit", help="process at most N shapes (quick try; resumable)")
STRICT = typer.Option(None, "--strict/--no-strict", help="exit non-zero when any shape fails")


def _run(fn, *args):
    """Run a stage; turn expected errors into a one-line message and exit code 1 (the one
    error-handling wrapper of every command)."""
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


@app.command("demo-data")
def demo_data(out: Optional[Path] = typer.Argument(None, help="output folder [params: demo.out]"),
              shapes_per_category: Optional[int] = typer.Option(None, help="[params: demo.shapes_per_category]"),
              seed: Optional[int] = typer.Option(None, help="[params: demo.seed]")) -> None:
    """Write the embedded procedural demo meshes (ShapeNetCore.v2 layout)."""
    from stages import demo_data as stage
    from stages.common import load_params

    p = load_params(stage.DemoParams, "demo", dict(out=str(out) if out else None,
                                                   shapes_per_category=shapes_per_category, seed=seed))
    _run(stage.run, p)


@app.command("index")
def index(root: Optional[Path] = typer.Argument(None, help="mesh folder [params: index.root]"),
          split_dir: Optional[Path] = typer.Option(None, help="folder with train.txt/test.txt lists"),
          test_fraction: Optional[float] = typer.Option(None, help="[params: index.test_fraction]"),
          seed: Optional[int] = typer.Option(None, help="[params: index.seed]"),
          limit: Optional[int] = typer.Option(None, help="keep only the first N shapes")) -> None:
    """Index a ShapeNet-layout (v1/v2) or plain <category>/<mesh> folder into shapes.parquet."""
    from stages import index as stage
    from stages.common import load_params

    p = load_params(stage.IndexParams, "index", dict(
        root=str(root) if root else None, split_dir=str(split_dir) if split_dir else None,
        test_fraction=test_fraction, seed=seed, limit=limit))
    _run(stage.run, p)


@app.command("render")
def render(resolution: Optional[int] = typer.Option(None, help="[params: render.resolution]"),
           views: Optional[str] = typer.Option(None, help='views as "az,el;az,el" in degrees [params: render.views]'),
           distance_factor: Optional[float] = typer.Option(None, help="[params: render.distance_factor]"),
           light_intensity: Optional[float] = typer.Option(None, help="[params: render.light_intensity]"),
           workers: Optional[int] = WORKERS, limit: Optional[int] = LIMIT,
           strict: Optional[bool] = STRICT) -> None:
    """Render every shape to RGB views (pyrender, offscreen) into renders.zarr."""
    from stages import render as stage
    from stages.common import load_params

    parsed = [[float(a) for a in v.split(",")] for v in views.split(";")] if views else None
    p = load_params(stage.RenderParams, "render", dict(
        resolution=resolution, views=parsed, distance_factor=distance_factor,
        light_intensity=light_intensity, workers=workers, limit=limit, strict=strict))
    _run(stage.run, p)


@app.command("sample")
def sample(points: Optional[int] = typer.Option(None, help="[params: sample.points]"),
           seed: Optional[int] = typer.Option(None, help="[params: sample.seed]"),
           workers: Optional[int] = WORKERS, limit: Optional[int] = LIMIT,
           strict: Optional[bool] = STRICT) -> None:
    """Sample surface points of every shape into points.zarr."""
    from stages import sample as stage
    from stages.common import load_params

    p = load_params(stage.SampleParams, "sample", dict(points=points, seed=seed, workers=workers,
                                                       limit=limit, strict=strict))
    _run(stage.run, p)


@app.command("embed")
def embed(image_teacher: Optional[str] = typer.Option(None, help="timm:<model> | open_clip:<model> | efficientnet_lite0 [params: embed.image_teacher]"),
          text_teacher: Optional[str] = typer.Option(None, help="open_clip:<model> | minilm [params: embed.text_teacher]"),
          image_weights: Optional[str] = typer.Option(None, help="local weights file, or 'random' [params: embed.image_weights]"),
          text_weights: Optional[str] = typer.Option(None, help="local weights file, or 'random' [params: embed.text_weights]"),
          variants: Optional[int] = typer.Option(None, help="augmented variants per view [params: embed.variants]"),
          batch_size: Optional[int] = typer.Option(None, help="[params: embed.batch_size]"),
          device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:i] [params: embed.device]"),
          precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA) | bf16 | fp32 [params: embed.precision]"),
          limit: Optional[int] = LIMIT) -> None:
    """Embed renders and prompts with the frozen teachers into teachers/{image,text}.zarr (torchrun: sharded)."""
    from pipeline.teachers import TeacherUnavailable
    from stages import embed as stage
    from stages.common import console, load_params

    p = load_params(stage.EmbedParams, "embed", dict(
        image_teacher=image_teacher, text_teacher=text_teacher, image_weights=image_weights,
        text_weights=text_weights, variants=variants, batch_size=batch_size, device=device,
        precision=precision, limit=limit))
    try:
        _run(stage.run, p)
    except TeacherUnavailable as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(1)


@app.command("inspect")
def inspect(store: Path = typer.Argument(Path("cache"), help="a store, or the cache folder"),
            as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
            parquet: Optional[Path] = typer.Option(None, help="export the store as a parquet table"),
            k: int = typer.Option(5, help="neighbours for the kNN category accuracy")) -> None:
    """Counts, failures, provenance and teacher sanity (cosine, kNN accuracy) of cached stores."""
    from stages import inspect as stage

    _run(stage.run, store, as_json, parquet, k)


@app.command("pretrain")
def pretrain(variant: Optional[str] = typer.Option(None, help="tiny | small | base [params: pretrain.variant]"),
             epochs: Optional[int] = typer.Option(None, help="[params: pretrain.epochs]"),
             batch_size: Optional[int] = typer.Option(None, help="global batch [params: pretrain.batch_size]"),
             micro_batch: Optional[int] = typer.Option(None, help="per-forward batch; accumulation fills the rest"),
             lr: Optional[float] = typer.Option(None, help="[params: pretrain.lr]"),
             schedule: Optional[str] = typer.Option(None, help="learning rate per epoch (the reference) or per step [params: pretrain.schedule]"),
             device: Optional[str] = typer.Option(None, help="auto | cpu | cuda [params: pretrain.device]"),
             compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the student"),
             cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph",
                                                       help="replay forward + backward as one CUDA graph (one GPU)"),
             loader_workers: Optional[str] = typer.Option(
                 None, help="auto | N: processes building micro-batches [params: pretrain.loader_workers]"),
             max_steps: Optional[int] = typer.Option(None, help="stop after N optimiser steps (smoke test)")) -> None:
    """Pretrain the ReCon student on points + cached teacher targets (torchrun: DDP)."""
    from stages import pretrain as stage

    workers = None if loader_workers is None else (loader_workers if loader_workers == "auto" else int(loader_workers))
    p = stage.params(dict(variant=variant, epochs=epochs, batch_size=batch_size, micro_batch=micro_batch,
                          lr=lr, schedule=schedule, device=device, compile=compile, cuda_graph=cuda_graph,
                          loader_workers=workers, max_steps=max_steps))
    _run(stage.run, p)


@app.command("study")
def study(out: Optional[Path] = typer.Option(None, help="output folder [params: study.out]"),
          arms: Optional[str] = typer.Option(None, help="comma list of arms [params: study.arms]"),
          modelnet40_root: Optional[Path] = typer.Option(None, help="modelnet40_normal_resampled folder to evaluate on too [params: study.modelnet40_root]"),
          quick: bool = typer.Option(False, "--quick", help="a smoke run: tiny student, a few steps")) -> None:
    """The ablation study: random init, reconstruction only, distillation only, ReCon raw / standardised targets."""
    from stages import study as stage

    p = stage.params(dict(out=str(out) if out else None, arms=arms.replace(",", " ").split() if arms else None,
                          modelnet40_root=str(modelnet40_root) if modelnet40_root else None, quick=quick or None))
    _run(stage.run, p)


@app.command("convert")
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


@app.command("finetune")
def finetune(task: str = typer.Option("classification", help="classification (params: finetune) | partseg (params: partseg)"),
             store: Optional[Path] = typer.Option(None, help="classification or part-segmentation store [params: <section>.store]"),
             profile: Optional[str] = typer.Option(None, help="classification: scanobjectnn(-hardest) | scanobjectnn-objbg | scanobjectnn-objonly | modelnet40 | modelnet40-8k | fewshot | demo; partseg: shapenetpart | demo-partseg [params: <section>.profile]"),
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
    """Fine-tune a classifier, or part segmentation (--task partseg), on a downstream store (torchrun: DDP)."""
    from stages import finetune as stage

    overrides = dict(store=str(store) if store else None, profile=profile, init=init, protocol=protocol,
                     epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, n_points=n_points, votes=votes,
                     val_fraction=val_fraction, seed=seed, seeds=_ints(seeds), device=device, max_steps=max_steps)
    p = _run(stage.params, overrides, task)
    _run(stage.run, p)


@app.command("evaluate")
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


@app.command("export")
def export(checkpoint: Optional[Path] = typer.Option(None, help="fine-tuned model.pt [params: export.checkpoint]"),
           onnx: Optional[Path] = typer.Option(None, "--onnx", help="output .onnx file [params: export.onnx]"),
           n_points: Optional[int] = typer.Option(None, help="example input size [params: export.n_points]"),
           check: Optional[bool] = typer.Option(None, "--check/--no-check", help="compare with torch in onnxruntime")) -> None:
    """Export a fine-tuned classifier or part-segmentation model (told apart by the checkpoint) to
    ONNX, grouping included, and check it with onnxruntime."""
    from stages import export as stage

    p = stage.params(dict(checkpoint=str(checkpoint) if checkpoint else None, onnx=str(onnx) if onnx else None,
                          n_points=n_points, check=check))
    _run(stage.run, p)


show_app = typer.Typer(help="Pictures for a person to look at.", no_args_is_help=True)
app.add_typer(show_app, name="show")


@show_app.command("reconstruction")
def show_reconstruction(checkpoint: Path = typer.Argument(..., help="model.pt or an epoch checkpoint"),
                        out: Path = typer.Option(Path("cache/reconstruction.png"), help="PNG to write"),
                        shapes: int = typer.Option(4, help="how many test shapes"),
                        seed: int = typer.Option(0, help="mask and subset seed")) -> None:
    """Input cloud, visible groups and reconstructed masked groups for a few shapes."""
    from stages import show

    _run(show.reconstruction, checkpoint, out, shapes, "test", seed)


@app.command("convert-checkpoint")
def convert_checkpoint(src: Path = typer.Argument(..., help="released reference .pth ({'base_model': ...})"),
                       dst: Path = typer.Argument(..., help="our model.pt"),
                       num_heads: Optional[int] = typer.Option(None, help="heads, if the width is not a standard variant")) -> None:
    """Convert a released ReCon pretraining checkpoint to our names (loaded with weights_only=True)."""
    from recon.network.reference import convert_reference_checkpoint
    from stages.common import console

    config = _run(convert_reference_checkpoint, src, dst, num_heads)
    console.print(f"[green]converted {src} → {dst}[/]: {config}")


if __name__ == "__main__":
    app()
