"""The cache layout: the one place that names the files and stores under the cache folder
(``cache/README.md`` describes them; ``dvc.yaml`` and ``params.yaml`` spell the same paths
literally, as DVC needs).

    cache/
      shapes.parquet                 index          renders.zarr, renders_preview.png   render
      points.zarr                    sample         teachers/{image,text}.zarr          embed
      failures/<stage>.parquet       every stage    downstream/*.zarr                   convert
      <stage>/                       a training stage's models, checkpoints, pictures (DVC-cached)
      metrics/<stage>/               its metrics.json, history.csv, ... (git-tracked)

Paths are relative to the cache folder, so a cache moves with its folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = "cache"

SHAPES = "shapes.parquet"
RENDERS = "renders.zarr"
RENDERS_PREVIEW = "renders_preview.png"
POINTS = "points.zarr"
TEACHERS = "teachers"
IMAGE_FEATURES = f"{TEACHERS}/image.zarr"
TEXT_FEATURES = f"{TEACHERS}/text.zarr"
FAILURES = "failures"
METRICS = "metrics"
DEMO_MESHES = "demo_meshes"
DEMO_STORE = "downstream/demo.zarr"              # the demo's classification store
DEMO_PARTS_STORE = "downstream/demo_parts.zarr"  # the demo's part-segmentation store
MODEL = "model.pt"                               # a training stage's final model, in cache/<stage>/
PRETRAINED = f"pretrain/{MODEL}"
FINETUNED = f"finetune/{MODEL}"

#: the stores of the pretraining cache, as ``recon inspect`` lists them
PRETRAINING_STORES = (RENDERS, POINTS, IMAGE_FEATURES, TEXT_FEATURES)


def default(relative: str) -> str:
    """A path in the default cache folder, as params defaults spell it (``cache/...``)."""
    return f"{DEFAULT_CACHE}/{relative}"


@dataclass(frozen=True)
class CacheLayout:
    """The paths of one cache folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def shapes(self) -> Path:
        return self.root / SHAPES

    @property
    def renders(self) -> Path:
        return self.root / RENDERS

    @property
    def renders_preview(self) -> Path:
        return self.root / RENDERS_PREVIEW

    @property
    def points(self) -> Path:
        return self.root / POINTS

    @property
    def teachers(self) -> Path:
        return self.root / TEACHERS

    @property
    def image_features(self) -> Path:
        return self.root / IMAGE_FEATURES

    @property
    def text_features(self) -> Path:
        return self.root / TEXT_FEATURES

    @property
    def failures(self) -> Path:
        return self.root / FAILURES

    def failure_table(self, stage: str) -> Path:
        return self.failures / f"{stage}.parquet"

    def stage(self, name: str) -> Path:
        """A training stage's output folder, e.g. ``cache/finetune``."""
        return self.root / name


def metrics_dir(out: Path) -> Path:
    """The git-tracked results folder of a stage whose outputs live in ``<cache>/<stage>``:
    ``<cache>/metrics/<stage>``."""
    return out.parent / METRICS / out.name
