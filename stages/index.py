"""Stage `index`: a mesh folder → ``cache/shapes.parquet`` (one row per shape, with its split)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline import layout
from pipeline.discover import DuplicateShapeIds, build_table, recorded_root
from stages.common import StageError, as_jsonable, cache_dir, console, write_failures


@dataclass
class IndexParams:
    root: str = layout.default(layout.DEMO_MESHES)  # mesh folder: ShapeNet v1/v2 or <category>/<mesh>
    split_dir: str | None = None  # folder with Point-BERT train.txt/test.txt; default: look in root
    test_fraction: float = 0.2    # seeded, stratified split when no lists are found
    seed: int = 0                 # the split's draw
    limit: int | None = None      # keep only the first N shapes (by id), for a quick try


def run(p: IndexParams, out: Path | None = None) -> pl.DataFrame:
    out = out or layout.CacheLayout(cache_dir()).shapes
    try:
        table, skipped, split_rule = build_table(Path(p.root), Path(p.split_dir) if p.split_dir else None,
                                                 p.test_fraction, p.seed, p.limit)
    except DuplicateShapeIds as err:
        raise StageError(f"index: {err}") from err
    if table.is_empty():
        raise SystemExit(f"index: no meshes found under {p.root}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # mesh paths are relative to the root, recorded once (relative to this table when given relative)
    meta = {"recon": json.dumps({"params": as_jsonable(p), "root": recorded_root(Path(p.root), out.parent),
                                 "split_rule": split_rule})}
    tmp = out.with_suffix(".parquet.tmp")
    table.write_parquet(tmp, metadata=meta)
    tmp.replace(out)
    write_failures("index", [{"id": s.id, "stage": "index", "error": s.error, "message": s.message}
                             for s in skipped], layout.CacheLayout(out.parent).failures)
    counts = table.group_by("category", "split").len().sort("category", "split")
    console.print(f"[green]index: {table.height} shapes in {table['category'].n_unique()} categories "
                  f"→ {out}[/]" + (f"; {len(skipped)} skipped (see failures/index.parquet)" if skipped else ""))
    console.print(counts.pivot(on="split", index="category", values="len").fill_null(0))
    return table
