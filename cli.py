"""`recon`: one thin command per pipeline stage.

Every stage command builds its parameters one way, ``stages.params.build_params``: the stage's
params dataclass (its defaults), then the ``params.yaml`` section named in ``SECTIONS``, then
``--set KEY=VALUE`` (any key of the section; ``KEY.SUB`` inside a dict field), then the explicit
options (None: not given). The help of those options and ``--help``'s list of every key (type,
default, params.yaml's value) come from the dataclass's field comments (``ParamsCommand``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from typer.core import HAS_RICH, TyperCommand

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

app = typer.Typer(help="ReCon point-cloud pretraining with an offline teacher-feature cache.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)

#: command -> {params.yaml section: its params dataclass as "module:Class"} (imported only when
#: used: the first section is the command's, the others are chosen by an option, e.g. --task)
SECTIONS: dict[str, dict[str, str]] = {
    "demo-data": {"demo": "stages.demo_data:DemoParams"},
    "index": {"index": "stages.index:IndexParams"},
    "render": {"render": "stages.render:RenderParams"},
    "sample": {"sample": "stages.sample:SampleParams"},
    "embed": {"embed": "stages.embed:EmbedParams"},
    "pretrain": {"pretrain": "recon.pretraining.trainer:PretrainParams"},
    "study": {"study": "stages.study:StudyStageParams"},
    "convert": {"convert": "stages.convert:ConvertParams"},
    "finetune": {"finetune": "recon.downstream.recipes:FinetuneParams",
                 "partseg": "recon.downstream.recipes:PartSegParams"},
    "evaluate": {"evaluate": "stages.evaluate:EvaluateParams"},
    "export": {"export": "stages.export:ExportParams"},
    "attention": {"attention": "stages.attention:AttentionParams"},
}

SETS = typer.Option(None, "--set", metavar="KEY=VALUE",
                    help="set any key of the command's params.yaml section (listed below) to a YAML value; "
                         "KEY.SUB=VALUE sets one entry of a dict field (e.g. model.depth=12); repeatable")
WORKERS = typer.Option(None, "--workers", "-j")
LIMIT = typer.Option(None, "--limit")
STRICT = typer.Option(None, "--strict/--no-strict")


def params_class(spec: str) -> type:
    """``"module:Class"`` → the class."""
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


class ParamsCommand(TyperCommand):
    """A stage command whose help is read from its params dataclass when asked for: an option
    named after a field gets the field's comment (before any note of its own about the command
    line form), and the epilog lists every key of the command's sections."""

    def format_help(self, ctx, formatter) -> None:
        from rich.markup import escape

        from stages.params import field_docs

        rich = HAS_RICH and self.rich_markup_mode == "rich"
        fix = escape if rich else str
        sections = [(section, params_class(spec)) for section, spec in SECTIONS[self.name].items()]
        if not getattr(self, "_documented", False):
            docs = field_docs(sections[0][1])
            for param in self.params:
                if param.name in docs:
                    param.help = fix("; ".join(t for t in (docs[param.name], getattr(param, "help", None)) if t))
            self._documented = True
        lines = keys_help(sections)
        self.epilog = "\n".join(fix(line) for line in lines) if rich else "\b\n" + "\n".join(lines)
        return super().format_help(ctx, formatter)


def keys_help(sections: list[tuple[str, type]]) -> list[str]:
    """Every key of each section: ``name: type = default (params.yaml: value) — comment``; a
    further section lists only the keys that differ from the first's."""
    import dataclasses
    import typing

    import yaml

    from stages.params import field_docs, override_class, params_file, type_name

    try:
        loaded = yaml.safe_load(params_file().read_text()) if params_file().exists() else {}
    except (OSError, yaml.YAMLError):
        loaded = {}
    loaded = loaded if isinstance(loaded, dict) else {}

    def show(value) -> str:
        if isinstance(value, str):
            return value or '""'
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20)
        return text.strip().removesuffix("...").strip()

    def rows(section: str, cls: type) -> dict[str, str]:
        given = loaded.get(section) if isinstance(loaded.get(section), dict) else {}
        hints, docs, out = typing.get_type_hints(cls), field_docs(cls), {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            row = f"  {f.name}: {type_name(hints[f.name])} = {show(default)}"
            if f.name in given and given[f.name] != default:
                row += f" (params.yaml: {show(given[f.name])})"
            row += f" — {docs[f.name]}"
            nested = override_class(cls, f.name)
            if nested is not None:
                row += f" (--set {f.name}.KEY=VALUE: KEY a field of {nested.__name__})"
            out[f.name] = row
        return out

    lines: list[str] = []
    first: dict[str, str] = {}
    for i, (section, cls) in enumerate(sections):
        these = rows(section, cls)
        if i == 0:
            first = these
            lines.append(f"Keys of params.yaml section {section} (defaults < params.yaml < --set < options):")
            lines += these.values()
        else:
            lines.append(f"Section {section}: the keys above, except:")
            lines += [row for key, row in these.items() if first.get(key) != row]
    return lines


def _params(command: str, sets: Optional[list[str]], **options):
    """The command's parameters, built the one way (``stages.params.build_params``)."""
    from stages.params import build_params

    section, spec = next(iter(SECTIONS[command].items()))
    return _run(build_params, params_class(spec), section, options, sets)


def _run(fn, *args):
    """Run a stage; turn expected errors into a one-line message and exit code 1 (the one
    error-handling wrapper of every command)."""
    from rich.markup import escape

    from pipeline.store import StoreError
    from stages.common import StageError, console

    try:
        return fn(*args)
    except (StageError, StoreError, FileNotFoundError, ValueError, KeyError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(1)


def _ints(text: Optional[str]) -> Optional[list[int]]:
    return [int(t) for t in text.replace(",", " ").split()] if text else None


def _words(text: Optional[str]) -> Optional[list[str]]:
    return [t for t in text.replace(",", " ").split()] if text else None


def _path(value: Optional[Path]) -> Optional[str]:
    return str(value) if value else None


@app.command("demo-data", cls=ParamsCommand)
def demo_data(out: Optional[Path] = typer.Argument(None, show_default=False),
              shapes_per_category: Optional[int] = typer.Option(None),
              seed: Optional[int] = typer.Option(None),
              sets: Optional[list[str]] = SETS) -> None:
    """Write the embedded procedural demo meshes (ShapeNetCore.v2 layout)."""
    from stages import demo_data as stage

    _run(stage.run, _params("demo-data", sets, out=_path(out), shapes_per_category=shapes_per_category, seed=seed))


@app.command("index", cls=ParamsCommand)
def index(root: Optional[Path] = typer.Argument(None, show_default=False),
          split_dir: Optional[Path] = typer.Option(None),
          test_fraction: Optional[float] = typer.Option(None),
          seed: Optional[int] = typer.Option(None),
          limit: Optional[int] = typer.Option(None),
          sets: Optional[list[str]] = SETS) -> None:
    """Index a ShapeNet-layout (v1/v2) or plain <category>/<mesh> folder into shapes.parquet."""
    from stages import index as stage

    _run(stage.run, _params("index", sets, root=_path(root), split_dir=_path(split_dir),
                            test_fraction=test_fraction, seed=seed, limit=limit))


@app.command("render", cls=ParamsCommand)
def render(resolution: Optional[int] = typer.Option(None),
           views: Optional[str] = typer.Option(None, help='on the command line "az,el;az,el"'),
           distance_factor: Optional[float] = typer.Option(None),
           light_intensity: Optional[float] = typer.Option(None),
           workers: Optional[int] = WORKERS, limit: Optional[int] = LIMIT,
           strict: Optional[bool] = STRICT, sets: Optional[list[str]] = SETS) -> None:
    """Render every shape to RGB views (pyrender, offscreen) into renders.zarr."""
    from stages import render as stage

    parsed = [[float(a) for a in v.split(",")] for v in views.split(";")] if views else None
    _run(stage.run, _params("render", sets, resolution=resolution, views=parsed, distance_factor=distance_factor,
                            light_intensity=light_intensity, workers=workers, limit=limit, strict=strict))


@app.command("sample", cls=ParamsCommand)
def sample(points: Optional[int] = typer.Option(None),
           seed: Optional[int] = typer.Option(None),
           workers: Optional[int] = WORKERS, limit: Optional[int] = LIMIT,
           strict: Optional[bool] = STRICT, sets: Optional[list[str]] = SETS) -> None:
    """Sample surface points of every shape into points.zarr."""
    from stages import sample as stage

    _run(stage.run, _params("sample", sets, points=points, seed=seed, workers=workers, limit=limit, strict=strict))


@app.command("embed", cls=ParamsCommand)
def embed(image_teacher: Optional[str] = typer.Option(None),
          text_teacher: Optional[str] = typer.Option(None),
          image_weights: Optional[str] = typer.Option(None),
          text_weights: Optional[str] = typer.Option(None),
          variants: Optional[int] = typer.Option(None),
          batch_size: Optional[int] = typer.Option(None),
          device: Optional[str] = typer.Option(None),
          precision: Optional[str] = typer.Option(None),
          limit: Optional[int] = LIMIT, sets: Optional[list[str]] = SETS) -> None:
    """Embed renders and prompts with the frozen teachers into teachers/{image,text}.zarr (torchrun: sharded)."""
    from pipeline.teachers import TeacherUnavailable
    from stages import embed as stage
    from stages.common import console

    p = _params("embed", sets, image_teacher=image_teacher, text_teacher=text_teacher, image_weights=image_weights,
                text_weights=text_weights, variants=variants, batch_size=batch_size, device=device,
                precision=precision, limit=limit)
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


@app.command("pretrain", cls=ParamsCommand)
def pretrain(variant: Optional[str] = typer.Option(None),
             epochs: Optional[int] = typer.Option(None),
             batch_size: Optional[int] = typer.Option(None),
             micro_batch: Optional[int] = typer.Option(None),
             lr: Optional[float] = typer.Option(None),
             schedule: Optional[str] = typer.Option(None),
             device: Optional[str] = typer.Option(None),
             compile: Optional[bool] = typer.Option(None, "--compile/--no-compile"),
             cuda_graph: Optional[bool] = typer.Option(None, "--cuda-graph/--no-cuda-graph"),
             loader_workers: Optional[str] = typer.Option(None, help="on the command line auto | N"),
             max_steps: Optional[int] = typer.Option(None),
             sets: Optional[list[str]] = SETS) -> None:
    """Pretrain the ReCon student on points + cached teacher targets (torchrun: DDP)."""
    from stages import pretrain as stage

    workers = None if loader_workers is None else (loader_workers if loader_workers == "auto" else int(loader_workers))
    p = _params("pretrain", sets, variant=variant, epochs=epochs, batch_size=batch_size, micro_batch=micro_batch,
                lr=lr, schedule=schedule, device=device, compile=compile, cuda_graph=cuda_graph,
                loader_workers=workers, max_steps=max_steps)
    _run(stage.run, p)


@app.command("study", cls=ParamsCommand)
def study(out: Optional[Path] = typer.Option(None),
          arms: Optional[str] = typer.Option(None, help="on the command line a comma list"),
          preset: Optional[str] = typer.Option(None),
          modelnet40_root: Optional[Path] = typer.Option(None),
          quick: bool = typer.Option(False, "--quick"),
          sets: Optional[list[str]] = SETS) -> None:
    """The ablation study: random init, reconstruction only, distillation only, ReCon raw / standardised
    targets; or, with --preset, the arms of one of the paper's ablation tables beside its figures."""
    from stages import study as stage

    p = _params("study", sets, out=_path(out), arms=_words(arms), preset=preset,
                modelnet40_root=_path(modelnet40_root), quick=quick or None)
    _run(stage.run, p)


@app.command("convert", cls=ParamsCommand)
def convert(format: Optional[str] = typer.Argument(None, show_default=False),
            source: Optional[Path] = typer.Argument(None, show_default=False),
            out: Optional[Path] = typer.Option(None),
            points: Optional[int] = typer.Option(None),
            normals: Optional[bool] = typer.Option(None, "--normals/--no-normals"),
            variant: Optional[str] = typer.Option(None),
            trust_pickle: bool = typer.Option(False, "--trust-pickle"),
            shape_names: Optional[Path] = typer.Option(None),
            device: Optional[str] = typer.Option(None),
            strict: Optional[bool] = STRICT,
            sets: Optional[list[str]] = SETS) -> None:
    """Convert a downstream dataset (or the project's points) into a classification store, or
    ShapeNetPart / the demo's parts into a part-segmentation store; the Labeled PSB folder
    (LabeledDB_new) into either (labeled-psb, labeled-psb-parts)."""
    from stages import convert as stage

    p = _params("convert", sets, format=format, source=_path(source), out=_path(out), points=points,
                normals=normals, variant=variant, trust_pickle=trust_pickle or None,
                shape_names=_path(shape_names), device=device, strict=strict)
    _run(stage.run, p)


@app.command("finetune", cls=ParamsCommand)
def finetune(task: str = typer.Option("classification",
                                      help="classification (params.yaml section finetune) | partseg (section partseg)"),
             store: Optional[Path] = typer.Option(None),
             profile: Optional[str] = typer.Option(None, help="partseg: shapenetpart | demo-partseg"),
             init: Optional[str] = typer.Option(None),
             protocol: Optional[str] = typer.Option(None),
             epochs: Optional[int] = typer.Option(None),
             batch_size: Optional[int] = typer.Option(None),
             lr: Optional[float] = typer.Option(None),
             schedule: Optional[str] = typer.Option(None),
             n_points: Optional[int] = typer.Option(None),
             votes: Optional[int] = typer.Option(None),
             val_fraction: Optional[float] = typer.Option(None),
             seed: Optional[int] = typer.Option(None),
             seeds: Optional[str] = typer.Option(None, "--seeds", help="on the command line a comma list, e.g. 0,1,2"),
             device: Optional[str] = typer.Option(None),
             max_steps: Optional[int] = typer.Option(None),
             sets: Optional[list[str]] = SETS) -> None:
    """Fine-tune a classifier, or part segmentation (--task partseg), on a downstream store (torchrun: DDP)."""
    from stages import finetune as stage

    overrides = dict(store=_path(store), profile=profile, init=init, protocol=protocol,
                     epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, n_points=n_points, votes=votes,
                     val_fraction=val_fraction, seed=seed, seeds=_ints(seeds), device=device, max_steps=max_steps)
    p = _run(stage.params, overrides, task, sets)
    _run(stage.run, p)


@app.command("evaluate", cls=ParamsCommand)
def evaluate(tasks: Optional[str] = typer.Option(None, help="on the command line a comma list"),
             checkpoint: Optional[str] = typer.Option(None),
             store: Optional[Path] = typer.Option(None),
             n_points: Optional[int] = typer.Option(None),
             text_store: Optional[Path] = typer.Option(None),
             image_store: Optional[Path] = typer.Option(None),
             ratio: Optional[float] = typer.Option(None),
             fewshot_folds: Optional[int] = typer.Option(None),
             fewshot_dir: Optional[Path] = typer.Option(None),
             baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline"),
             out: Optional[Path] = typer.Option(None, "--out",
                                                help="give it for a run by hand: the pipeline's own is a DVC output"),
             device: Optional[str] = typer.Option(None),
             sets: Optional[list[str]] = SETS) -> None:
    """Linear SVM, zero-shot and few-shot evaluation of the pretrained encoder."""
    from stages import evaluate as stage
    from stages.common import StageError

    p = _params("evaluate", sets, tasks=_words(tasks), checkpoint=checkpoint, store=_path(store), n_points=n_points,
                text_store=_path(text_store), image_store=_path(image_store), ratio=ratio,
                fewshot_folds=fewshot_folds, fewshot_dir=_path(fewshot_dir), baseline=baseline, out=_path(out),
                device=device)

    def run_by_hand(p: stage.EvaluateParams) -> dict:
        pipeline = stage.params()
        if p.out == pipeline.out and (p.checkpoint, p.store) != (pipeline.checkpoint, pipeline.store):
            raise StageError(f"evaluating {p.checkpoint} on {p.store} would overwrite the pipeline's own "
                             f"metrics (a DVC output): give --out FOLDER")
        return stage.run(p)

    _run(run_by_hand, p)


@app.command("export", cls=ParamsCommand)
def export(checkpoint: Optional[Path] = typer.Option(None),
           onnx: Optional[Path] = typer.Option(None, "--onnx"),
           n_points: Optional[int] = typer.Option(None),
           check: Optional[bool] = typer.Option(None, "--check/--no-check"),
           sets: Optional[list[str]] = SETS) -> None:
    """Export a fine-tuned classifier or part-segmentation model (told apart by the checkpoint) to
    ONNX, grouping included, and check it with onnxruntime."""
    from stages import export as stage

    _run(stage.run, _params("export", sets, checkpoint=_path(checkpoint), onnx=_path(onnx), n_points=n_points,
                            check=check))


@app.command("attention", cls=ParamsCommand)
def attention(checkpoints: Optional[list[str]] = typer.Argument(None, show_default=False,
                                                                help="a folder stands for its model.pt or latest "
                                                                     "checkpoint (a study arm's cache/study/<arm>)"),
              store: Optional[Path] = typer.Option(None),
              split: Optional[str] = typer.Option(None),
              shapes: Optional[int] = typer.Option(None),
              n_points: Optional[int] = typer.Option(None),
              seed: Optional[int] = typer.Option(None),
              baseline: Optional[bool] = typer.Option(None, "--baseline/--no-baseline"),
              out: Optional[Path] = typer.Option(None, "--out"),
              device: Optional[str] = typer.Option(None),
              sets: Optional[list[str]] = SETS) -> None:
    """Mean attention distance of every encoder block (patch tokens and queries), checkpoints side by side: JSON + plot."""
    from stages import attention as stage

    p = _params("attention", sets, checkpoints=checkpoints or None, store=_path(store), split=split, shapes=shapes,
                n_points=n_points, seed=seed, baseline=baseline, out=_path(out), device=device)
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
