"""Stage `render`: every shape's mesh → RGB views in ``cache/renders.zarr`` (+ a contact sheet)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline.store import ArraySpec, open_store
from stages.common import as_jsonable, cache_dir, console, read_shapes
from stages.per_shape import run_per_shape


@dataclass
class RenderParams:
    resolution: int = 224           # square image side in pixels
    views: list[list[float]] = field(default_factory=lambda: [[30.0, 20.0]])  # [azimuth, elevation] per view, degrees
    distance_factor: float = 1.05   # × the distance at which the unit sphere fills the field of view
    yfov_deg: float = 40.0          # vertical field of view in degrees
    light_intensity: float = 3.0    # directional light attached to the camera (pyrender units)
    fill_fraction: float = 0.35     # a second, weaker light from above-left, as a fraction of light_intensity
    ambient: float = 0.35           # ambient light
    smooth: bool = False            # smooth (vertex-normal) shading; false: flat, best for CAD models
    workers: int = 2                # worker processes
    chunk_rows: int = 8             # shapes per store chunk (the unit of resuming)
    limit: int | None = None        # process at most N shapes (quick try; resumable)
    strict: bool = False            # exit non-zero when any shape fails
    preview_per_category: int = 4   # shapes per category on the contact sheet


def render_config(p: RenderParams):
    """The renderer's config from the stage params (same names)."""
    from pipeline.render import RenderConfig

    values = {f.name: getattr(p, f.name) for f in fields(RenderConfig) if hasattr(p, f.name)}
    return RenderConfig(**{**values, "views": [tuple(v) for v in p.views]})


def _render_row(config, row: dict) -> dict[str, np.ndarray]:
    from pipeline.render import render_views

    return {"images": render_views(row["mesh_path"], config)}


def run(p: RenderParams, shapes: Path | None = None, out: Path | None = None) -> Path:
    table = read_shapes(shapes, mesh_paths=True)
    out = out or layout.CacheLayout(cache_dir()).renders
    config = render_config(p)
    store_params = {k: v for k, v in as_jsonable(p).items()
                    if k not in ("workers", "limit", "strict", "preview_per_category")}
    arrays = {"images": ArraySpec((len(p.views), p.resolution, p.resolution, 3), "uint8", p.chunk_rows)}
    provenance = config.provenance()
    # pool workers exist only to render, so they render in place (one process, not two, per worker)
    from pipeline.render import render_in_this_process

    complete = run_per_shape("render", table, out, arrays, store_params, provenance,
                             partial(_render_row, config), p.workers, p.limit, p.strict,
                             failures_dir=layout.CacheLayout(out.parent).failures,
                             worker_init=render_in_this_process)
    if complete:
        write_preview(out, table, layout.CacheLayout(out.parent).renders_preview, p.preview_per_category)
    return out


def write_preview(store_path: Path, table, png: Path, per_category: int = 4, max_categories: int = 12,
                  tile: int = 128) -> Path:
    """A contact sheet that fits a screen: the first view of ``per_category`` ok shapes (the first
    ones in table order) of at most ``max_categories`` categories (all of them when there are
    few, else an even spread over the sorted names), one row per category, tiles of ``tile``
    pixels labelled by category and shape id: at most 12 x 4 tiles of 128 px by default."""
    from pipeline.render import contact_sheet

    store = open_store(store_path)
    rows_by_category: dict[str, list[tuple[int, dict]]] = {}
    for i, row in enumerate(table.iter_rows(named=True)):
        if store.ok[i]:
            rows_by_category.setdefault(row["category"], []).append((i, row))
    categories = sorted(rows_by_category)
    if len(categories) > max_categories:
        picks = np.linspace(0, len(categories) - 1, max_categories).round().astype(int)
        categories = [categories[k] for k in picks]
    images, labels = [], []
    for category in categories:
        for i, row in rows_by_category[category][:per_category]:
            images.append(np.asarray(store["images"][i, 0]))
            labels.append(preview_label(category, row["id"], tile))
    if images:
        contact_sheet(images, labels, columns=per_category, tile=tile).save(png)
        shown = f"{len(categories)} of {len(rows_by_category)} categories" if len(rows_by_category) > len(categories) \
            else f"{len(categories)} categories"
        console.print(f"preview: {png} ({shown})")
    return png


def preview_label(category: str, shape_id: str, tile: int) -> str:
    """``category id`` cut to the tile's width (about 6 px a character); the id loses its
    ``<category>-`` or ``<synset>-`` prefix, so what shows is the part that tells shapes apart."""
    short = shape_id.split("-", 1)[1] if "-" in shape_id else shape_id
    text = f"{category} {short}"
    width = max(4, tile // 6)
    return text if len(text) <= width else text[:width - 1] + "…"
