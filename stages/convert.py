"""Stage `convert`: a public downstream dataset (or the project's own points) → a classification
store (``pipeline/convert.py`` documents the layout), e.g. ``cache/downstream/demo.zarr``; or a
part-segmentation store (``pipeline/partseg_store.py``) from ShapeNetPart (``shapenetpart``) or from the
demo meshes' parts (``demo-parts``, source: the cache folder).

Unreadable rows (listed-but-missing files, too few points) are recorded in
``cache/failures/convert.parquet`` (``convert-<format>.parquet`` for the part-segmentation formats)
and never stop the stage (unless ``strict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline import convert as C
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
    format: str = "points"                 # modelnet40 | modelnet10 | pointbert-dat | fewshot-pkl | scanobjectnn | points | shapenetpart | demo-parts
    source: str = layout.DEFAULT_CACHE     # dataset root (the cache folder for `points`)
    out: str = layout.default(layout.DEMO_STORE)  # the store; a folder of fold stores for fewshot-pkl
    points: int | None = None              # FPS to this many points; null keeps the source's count (ModelNet text: 8192)
    normals: bool = False                  # keep normals (text and pickle formats)
    variant: str = "PB_T50_RS"             # scanobjectnn: OBJ_BG | OBJ_ONLY | PB_T50_RS
    trust_pickle: bool = False             # pointbert-dat / fewshot-pkl are pickles: load only files you trust
    shape_names: str | None = None         # fewshot-pkl: modelnet40_shape_names.txt, to name classes
    chunk_rows: int = 16                   # shapes per store chunk
    device: str = "auto"                   # where FPS runs: auto | cpu | cuda
    strict: bool = False                   # exit non-zero when any shape fails
    sampling: str = "subset"               # shapenetpart: subset | with_replacement (the reference's draw)
    seed: int = 0                          # shapenetpart / demo-parts: per-shape seeds of the point choice


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run(p: ConvertParams) -> list[C.ConvertResult]:
    if p.format not in C.FORMATS + PS.FORMATS:
        raise StageError(f"unknown format {p.format!r}; choose from {', '.join(C.FORMATS + PS.FORMATS)}")
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
    # part-segmentation formats get their own table, so their DVC stage does not share an output
    path = write_failures("convert" if p.format in C.FORMATS else f"convert-{p.format}", failures)
    for r in results:
        console.print(f"[green]convert: {r.rows - r.failed}/{r.rows} shapes → {r.path}[/]")
    summarise("convert", sum(r.rows for r in results), len(failures), timer.seconds, p.strict, path)
    return results
