"""Stage `demo-data`: write the embedded procedural mesh set (ShapeNetCore.v2 layout)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import layout
from stages.common import Timer, console
from stages.params import build_params


@dataclass
class DemoParams:
    out: str = layout.default(layout.DEMO_MESHES)  # output folder (ShapeNetCore.v2 layout)
    shapes_per_category: int = 24                  # procedural meshes per category
    seed: int = 0                                  # the meshes' random shapes
    categories: list[str] = field(default_factory=list)  # empty: all demo categories
    only_if_indexed: bool = False                  # skip unless index.root is `out` (dvc: your own meshes skip the demo)


def run(p: DemoParams) -> Path:
    from pipeline.demo import generate_demo
    from pipeline.unused import mark_unused
    from stages.index import IndexParams

    out = Path(p.out)
    root = build_params(IndexParams, "index").root if p.only_if_indexed else None
    if root is not None and Path(root).resolve() != out.resolve():   # the pipeline indexes your own meshes
        mark_unused(out, f"index.root is {root}, not the demo meshes ({out})")
        console.print(f"demo-data: not needed (index.root is {root}); {out} holds only a marker")
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with Timer() as timer:
        paths = generate_demo(tmp, shapes_per_category=p.shapes_per_category, seed=p.seed,
                              categories=p.categories or None)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    console.print(f"[green]demo-data: {len(paths)} meshes in {out} ({timer.seconds:.1f} s)[/]")
    return out
