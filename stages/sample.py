"""Stage `sample`: every shape's surface → ``cache/points.zarr`` (float32, unit sphere)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline.store import ArraySpec
from stages.common import as_jsonable, cache_dir, read_shapes
from stages.per_shape import run_per_shape


@dataclass
class SampleParams:
    points: int = 8192              # surface points per shape
    seed: int = 0                   # per-shape sampling seeds
    workers: int = 2                # worker processes
    chunk_rows: int = 16            # shapes per store chunk (the unit of resuming)
    limit: int | None = None        # process at most N shapes (quick try; resumable)
    strict: bool = False            # exit non-zero when any shape fails


def _sample_row(n_points: int, seed: int, row: dict) -> dict[str, np.ndarray]:
    from pipeline.sampling import sample_shape

    return {"points": sample_shape(row["mesh_path"], n_points, seed, row["id"])}


def run(p: SampleParams, shapes: Path | None = None, out: Path | None = None) -> bool:
    """Sample every shape; True when the store is complete (False: stopped by --limit)."""
    table = read_shapes(shapes, mesh_paths=True)
    out = out or layout.CacheLayout(cache_dir()).points
    store_params = {k: v for k, v in as_jsonable(p).items() if k in ("points", "seed", "chunk_rows")}
    from pipeline.sampling import NORMALIZATION, SAMPLER_NAME

    provenance = {"sampler": SAMPLER_NAME, "seeding": "per shape: sha256(seed, shape id)",
                  "normalisation": NORMALIZATION}
    arrays = {"points": ArraySpec((p.points, 3), "float32", p.chunk_rows)}
    return run_per_shape("sample", table, out, arrays, store_params, provenance,
                         partial(_sample_row, p.points, p.seed), p.workers, p.limit, p.strict,
                         failures_dir=layout.CacheLayout(out.parent).failures)
