"""Stage `convert`: a public downstream dataset (or the project's own points) → a classification
store (``pipeline/convert.py`` documents the layout), e.g. ``cache/downstream/demo.zarr``.

Unreadable rows (listed-but-missing files, too few points) are recorded in
``cache/failures/convert.parquet`` and never stop the stage (unless ``strict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import convert as C
from stages.common import (
    StageError,
    Timer,
    console,
    summarise,
    write_failures,
)


@dataclass
class ConvertParams:
    format: str = "points"                 # modelnet40 | modelnet10 | pointbert-dat | fewshot-pkl | scanobjectnn | points
    source: str = "cache"                  # dataset root (the cache folder for `points`)
    out: str = "cache/downstream/demo.zarr"  # the store; a folder of fold stores for fewshot-pkl
    points: int | None = None              # FPS to this many points; null keeps the source's count (ModelNet text: 8192)
    normals: bool = False                  # keep normals (text and pickle formats)
    variant: str = "PB_T50_RS"             # scanobjectnn: OBJ_BG | OBJ_ONLY | PB_T50_RS
    trust_pickle: bool = False             # pointbert-dat / fewshot-pkl are pickles: load only files you trust
    shape_names: str | None = None         # fewshot-pkl: modelnet40_shape_names.txt, to name classes
    chunk_rows: int = 16
    device: str = "auto"                   # where FPS runs
    strict: bool = False


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run(p: ConvertParams) -> list[C.ConvertResult]:
    if p.format not in C.FORMATS:
        raise StageError(f"unknown format {p.format!r}; choose from {', '.join(C.FORMATS)}")
    src, out, dev = Path(p.source), Path(p.out), _device(p.device)
    common = dict(chunk_rows=p.chunk_rows, device=dev, log=console.print)
    with Timer() as timer:
        if p.format in ("modelnet40", "modelnet10"):
            results = [C.convert_modelnet(src, out, p.points or 8192, p.normals, p.format, **common)]
        elif p.format == "pointbert-dat":
            results = [C.convert_pointbert_dat(src, out, p.points, p.normals, p.trust_pickle, **common)]
        elif p.format == "fewshot-pkl":
            results = C.convert_fewshot(src, out, p.points, p.normals, p.trust_pickle, p.shape_names, **common)
        elif p.format == "scanobjectnn":
            results = [C.convert_scanobjectnn(src, out, p.variant, p.points, **common)]
        else:
            results = [C.convert_points(src, out, p.points, **common)]
    failures = [f for r in results for f in r.failures]
    path = write_failures("convert", failures)
    for r in results:
        console.print(f"[green]convert: {r.rows - r.failed}/{r.rows} shapes → {r.path}[/]")
    summarise("convert", sum(r.rows for r in results), len(failures), timer.seconds, p.strict, path)
    return results
