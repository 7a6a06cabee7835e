"""Stage `convert`: a public downstream dataset (or the project's own points) → a classification
store (``pipeline/convert.py`` documents the layout), e.g. ``cache/downstream/demo.zarr``; or a
part-segmentation store (``pipeline/partseg_store.py``) from ShapeNetPart (``shapenetpart``) or from the
demo meshes' parts (``demo-parts``, source: the cache folder).

The Labeled PSB segmentation benchmark (``pipeline/labeled_psb.py``, ``docs/labeled-psb.md``; source: its
``LabeledDB_new`` folder of ``<Class>/<n>.off`` + ``<n>_labels.txt``) gives both: ``labeled-psb`` a
classification store (class = folder), ``labeled-psb-parts`` a part-segmentation store (per-face part
labels carried by area-weighted surface samples; per-class sorted part names, global ids offset class
by class). Both draw ``points`` (default 2048) samples per mesh, seeded by ``seed`` and the shape id, and
share one seeded split stratified by class (``test_fraction``).

Unreadable rows (listed-but-missing files, too few points) are recorded in
``cache/failures/convert.parquet`` (``convert-<format>.parquet`` for the part-segmentation and the
Labeled PSB formats) and never stop the stage (unless ``strict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline import convert as C
from pipeline import labeled_psb as LP
from pipeline import layout
from pipeline import partseg_store as PS
from stages.common import (
    StageError,
    Timer,
    console,
    summarise,
    write_failures,
)


@dataclass
class ConvertParams:
    #: modelnet40 | modelnet10 | pointbert-dat | fewshot-pkl | scanobjectnn | points | shapenetpart | demo-parts |
    #: labeled-psb | labeled-psb-parts
    format: str = "points"
    source: str = layout.DEFAULT_CACHE     # dataset root (`points`: the cache folder; labeled-psb*: LabeledDB_new)
    out: str = layout.default(layout.DEMO_STORE)  # the store; a folder of fold stores for fewshot-pkl
    points: int | None = None              # FPS to this many points; null: the source's (ModelNet 8192; meshes 2048)
    normals: bool = False                  # keep normals (text and pickle formats; labeled-psb: face normals)
    variant: str = "PB_T50_RS"             # scanobjectnn: OBJ_BG | OBJ_ONLY | PB_T50_RS
    trust_pickle: bool = False             # pointbert-dat / fewshot-pkl are pickles: load only files you trust
    shape_names: str | None = None         # fewshot-pkl: modelnet40_shape_names.txt, to name classes
    chunk_rows: int = 16                   # shapes per store chunk
    device: str = "auto"                   # where FPS runs: auto | cpu | cuda
    strict: bool = False                   # exit non-zero when any shape fails
    sampling: str = "subset"               # shapenetpart: subset | with_replacement (the reference's draw)
    seed: int = 0                          # per-shape point choice (shapenetpart, demo-parts, labeled-psb*), and split
    test_fraction: float = 0.2             # labeled-psb*: share of each class in the seeded, stratified test split


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run(p: ConvertParams) -> list[C.ConvertResult]:
    formats = C.FORMATS + PS.FORMATS + LP.FORMATS
    if p.format not in formats:
        raise StageError(f"unknown format {p.format!r}; choose from {', '.join(formats)}")
    src, out, dev = Path(p.source), Path(p.out), _device(p.device)
    from recon.network.pointops import fps_indices

    common = dict(chunk_rows=p.chunk_rows, fps=partial(fps_indices, device=dev), log=console.print)
    with Timer() as timer:
        if p.format in ("modelnet40", "modelnet10"):
            results = [C.convert_modelnet(src, out, p.points or 8192, p.normals, p.format, **common)]
        elif p.format == "pointbert-dat":
            results = [C.convert_pointbert_dat(src, out, p.points, p.normals, p.trust_pickle, **common)]
        elif p.format == "fewshot-pkl":
            results = C.convert_fewshot(src, out, p.points, p.normals, p.trust_pickle, p.shape_names, **common)
        elif p.format == "scanobjectnn":
            results = [C.convert_scanobjectnn(src, out, p.variant, p.points, **common)]
        elif p.format == "shapenetpart":
            results = [PS.convert_shapenetpart(src, out, p.points or 2048, p.seed, p.sampling,
                                               p.chunk_rows, console.print)]
        elif p.format == "labeled-psb":
            results = [LP.convert_labeled_psb(src, out, p.points or 2048, p.seed, p.test_fraction, p.normals,
                                              p.chunk_rows, console.print)]
        elif p.format == "labeled-psb-parts":
            results = [LP.convert_labeled_psb_parts(src, out, p.points or 2048, p.seed, p.test_fraction,
                                                    p.chunk_rows, console.print)]
        elif p.format == "demo-parts":
            from pipeline.demo_parts import convert_demo_parts
            from pipeline.unused import mark_unused, unused_reason

            reason = unused_reason(layout.CacheLayout(src).root / layout.DEMO_MESHES)
            if reason:   # the pipeline runs on your own meshes: they have no demo part labels
                mark_unused(out, f"no demo meshes ({reason})")
                console.print(f"convert demo-parts: not needed ({reason}); {out} holds only a marker")
                results = []
            else:
                results = [convert_demo_parts(src, out, p.points or 2048, p.seed, p.chunk_rows, console.print)]
        else:
            results = [C.convert_points(src, out, p.points, **common)]
    failures = [f for r in results for f in r.failures]
    # part-segmentation and Labeled PSB formats get their own table, so their DVC stages (and runs by hand)
    # do not overwrite the classification stage's output
    path = write_failures("convert" if p.format in C.FORMATS else f"convert-{p.format}", failures)
    for r in results:
        console.print(f"[green]convert: {r.rows - r.failed}/{r.rows} shapes → {r.path}[/]")
    summarise("convert", sum(r.rows for r in results), len(failures), timer.seconds, p.strict, path)
    return results
