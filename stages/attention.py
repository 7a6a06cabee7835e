"""`recon attention CKPT [CKPT ...]` (not a dvc stage): the mean attention distance of every
encoder block (ReCon, Fig. 1(b)) of one or more pretrained checkpoints, side by side, on a few
shapes of a classification store (recon/downstream/attention.py says what is measured).

A checkpoint is a ``model.pt`` / epoch checkpoint / reference ``.pth``, or a folder holding one
(``model.pt``, else the latest ``checkpoints/epoch-*.pt``, also under ``pretrain/``: a study arm's
folder ``cache/study/<arm>`` works as it is); ``NAME=PATH`` names it, otherwise its folder does
(``checkpoints`` and a run's ``pretrain`` folder skipped: ``cache/study/rec_only/pretrain/
checkpoints/epoch-0009.pt`` is ``rec_only``). ``baseline`` adds the first checkpoint's network at
random init (BatchNorm statistics re-estimated on train clouds, as ``recon evaluate`` does).
Outputs: ``<out>.json`` (one entry per checkpoint) and ``<out>.png`` beside it; by default
``cache/attention/<names joined by +>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import layout
from recon.downstream.attention import attention_distances, plot_distances
from recon.downstream.cls_data import eval_clouds, load_classification
from recon.downstream.evaluate import baseline_batchnorm, load_pretrained
from recon.pretraining.probes import random_init_like
from recon.runtime import trainstate
from recon.runtime.distributed import pick_device
from stages.common import StageError, cache_dir, console
from stages.params import build_params

#: folders skipped when a checkpoint is named after its folder
SKIPPED = ("checkpoints", "pretrain")


@dataclass
class AttentionParams:
    #: checkpoints (files or folders), each PATH or NAME=PATH; compared side by side
    checkpoints: list[str] = field(default_factory=lambda: [layout.default(layout.PRETRAINED)])
    store: str = layout.default(layout.DEMO_STORE)  # classification store the shapes come from
    split: str = "test"                           # the store's split the shapes come from
    shapes: int = 64                              # shapes averaged over (a seeded choice); 0 = the whole split
    n_points: int = 1024                          # points per cloud (FPS of the normalised cloud)
    normalize: bool = True                        # centre + unit sphere first (distances in those units)
    batch: int = 32                               # clouds per forward
    seed: int = 0                                 # the choice of shapes and the baseline's init
    baseline: bool = False                        # also the first checkpoint's network at random init (random_init)
    bn_recalibrate: int = 256                     # the baseline's BatchNorm statistics from this many train clouds
    out: str | None = None                        # the JSON to write (.json added), the PNG beside it; None = cache/attention/<names>.json
    device: str = "auto"                          # auto | cpu | cuda[:i]


def params(overrides: dict | None = None, sets: list[str] | None = None) -> AttentionParams:
    return build_params(AttentionParams, "attention", overrides, sets)


def checkpoint_file(path: Path) -> Path:
    """The checkpoint a path stands for: the file itself, or a folder's ``model.pt`` or latest
    ``checkpoints/epoch-*.pt`` (also under ``pretrain/``)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} not found")
    for folder in (path, path / "pretrain"):
        found = folder / layout.MODEL if (folder / layout.MODEL).is_file() else trainstate.latest(folder / "checkpoints")
        if found is not None:
            return found
    raise StageError(f"no checkpoint in {path} (model.pt or checkpoints/epoch-*.pt, also under pretrain/): "
                     f"a study's random_init arm saves none, use --baseline for it")


def default_name(given: Path, file: Path, cache: Path) -> str:
    """The folder a checkpoint is named after: a given folder's own name; else the file's folder,
    skipping ``checkpoints`` and a ``pretrain`` folder inside a run (not the cache's own)."""
    if given.is_dir():
        return given.resolve().name
    folder = file.resolve().parent
    if folder.name == "checkpoints":
        folder = folder.parent
    if folder.name == "pretrain" and folder.parent != cache.resolve() and folder.parent.name:
        folder = folder.parent
    return folder.name or file.stem


def resolve(specs: list[str], cache: Path) -> dict[str, Path]:
    """name -> checkpoint file of ``PATH`` / ``NAME=PATH`` specs; repeated names get the file's stem."""
    entries: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if sep and name and os.sep not in name and not Path(spec).exists():
            given, chosen = Path(rest), name
        else:
            given, chosen = Path(spec), None
        file = checkpoint_file(given)
        entries.append((chosen or default_name(given, file, cache), file))
    names = [n for n, _ in entries]
    entries = [(f"{n}/{f.stem}" if names.count(n) > 1 else n, f) for n, f in entries]
    if len({n for n, _ in entries}) < len(entries):
        raise StageError(f"checkpoint names repeat: {[n for n, _ in entries]}; name them NAME=PATH")
    return dict(entries)


def default_out(names: list[str], cache: Path) -> Path:
    stem = "+".join(n.replace("/", "-") for n in names)
    if len(stem) > 100:
        stem = f"{names[0].replace('/', '-')}+{len(names) - 1}-more"
    return layout.CacheLayout(cache).stage("attention") / f"{stem}.json"


def run(p: AttentionParams, cache: Path | None = None) -> dict:
    cache = cache or cache_dir()
    if not p.checkpoints:
        raise StageError("give at least one checkpoint")
    files = resolve(p.checkpoints, cache)
    if p.baseline and "random_init" in files:
        raise StageError("a checkpoint is named random_init: with --baseline that name is taken")
    device = pick_device(p.device)
    data = load_classification(p.store, p.split)
    if not len(data):
        raise StageError(f"{p.store} has no usable {p.split} shapes")
    rows = np.arange(len(data))
    if 0 < p.shapes < len(rows):
        rows = np.sort(np.random.default_rng(p.seed).permutation(len(rows))[:p.shapes])
    clouds = eval_clouds(data.subset(rows), p.n_points, p.normalize, device)
    results: dict[str, dict] = {}
    first = None
    for name, file in files.items():
        model = load_pretrained(file).to(device)
        first = model if first is None else first
        results[name] = {"checkpoint": str(file), "targets": list(model.cfg.targets),
                         **attention_distances(model, clouds, p.batch, device)}
        _report(name, results[name])
    if p.baseline:
        model = random_init_like(first, p.seed).to(device)
        train = load_classification(p.store, "train") if p.bn_recalibrate > 0 else None
        calibrated = baseline_batchnorm(model, train, p.n_points, p.normalize, p.bn_recalibrate, p.seed, device)
        results["random_init"] = {"checkpoint": f"random init (seed {p.seed}) of {next(iter(files.values()))}",
                                  "targets": [], "bn_recalibrated_clouds": calibrated,
                                  **attention_distances(model, clouds, p.batch, device)}
        _report("random_init", results["random_init"])
    definition = {}
    for r in results.values():
        definition = r.pop("definition")
    out = Path(p.out).with_suffix(".json") if p.out else default_out(list(results), cache)
    units = "normalised cloud (unit sphere)" if p.normalize else "the store's coordinates"
    report = {"store": p.store, "split": p.split, "shapes": int(len(rows)), "n_points": int(clouds.shape[1]),
              "normalize": p.normalize, "seed": p.seed, "units": units, "definition": definition,
              "checkpoints": results}
    trainstate.write_json(out, report)
    png = plot_distances(results, out.with_suffix(".png"),
                         f"mean attention distance per block ({len(rows)} {p.split} shapes of {Path(p.store).name})")
    console.print(f"[green]attention: done → {out}, {png}[/]")
    return report


def _report(name: str, r: dict) -> None:
    def row(values: list[float]) -> str:
        return " ".join(f"{v:.3f}" for v in values)

    console.print(f"attention {name}: patches {row(r['patches']['per_block'])}; queries {row(r['queries']['per_block'])} "
                  f"(uniform attention {r['uniform']:.3f})")
