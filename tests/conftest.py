"""Test-wide settings: offline, headless, fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ["DVC_NO_ANALYTICS"] = "1"

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``../shared`` next to the clone (or $RECON_SHARED)."""
    return Path(os.environ.get("RECON_SHARED", ROOT.parent / "shared"))


def reference_dir() -> Path:
    """The released model's fixtures (skips the test when absent)."""
    path = shared_dir() / "fixtures" / "reference"
    if not path.exists():
        pytest.skip(f"reference fixtures not available at {path}")
    return path


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Small tensors on a 2-core box: intra-op threads only add contention (the tests that
    start processes set OMP_NUM_THREADS=1 for them)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared() -> Path:
    return shared_dir()


@pytest.fixture
def meshes_dir() -> Path:
    path = shared_dir() / "data" / "meshes"
    if not path.is_dir():
        pytest.skip(f"real meshes not present at {path}")
    return path


def write_synthetic_cache(cache: Path, n_per_class: int = 4, n_points: int = 512,
                          image_dim: int = 16, text_dim: int = 8, variants: int = 2,
                          templates: int = 4, seed: int = 0, views: int = 1) -> Path:
    """A cache with shapes.parquet, points.zarr and teacher stores, without rendering: three
    categories of simple clouds (sphere, cube, cylinder) with features that separate them
    (``views`` image views per shape, each ``variants`` variants)."""
    import numpy as np
    import polars as pl

    from pipeline.layout import CacheLayout
    from pipeline.store import ArraySpec, StoreWriter

    rng = np.random.default_rng(seed)
    categories = ["ball", "box", "can"]
    ids, cats, splits, clouds = [], [], [], []
    for c, name in enumerate(categories):
        for i in range(n_per_class):
            ids.append(f"{name}-{i}")
            cats.append(name)
            splits.append("test" if i == 0 else "train")
            x = rng.normal(size=(n_points, 3))
            if name == "ball":
                x /= np.linalg.norm(x, axis=1, keepdims=True)
            elif name == "box":
                x = np.clip(x, -1, 1)
            else:
                x[:, :2] /= np.linalg.norm(x[:, :2], axis=1, keepdims=True)
                x[:, 2] = rng.uniform(-1, 1, n_points)
            x *= rng.uniform(0.8, 1.2, size=3)
            clouds.append((x / np.linalg.norm(x, axis=1).max()).astype(np.float32))
    cache.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"id": ids, "synset": [""] * len(ids), "category": cats, "split": splits,
                  "mesh_path": [""] * len(ids), "status": ["indexed"] * len(ids)}).write_parquet(CacheLayout(cache).shapes)

    def write(path, rows, arrays, data):
        writer = StoreWriter.open(path, rows, arrays, {"synthetic": True})
        writer.write_rows(np.arange(len(rows)), data, np.ones(len(rows), bool))
        writer.finalise()
        return writer

    n = len(ids)
    write(CacheLayout(cache).points, ids, {"points": ArraySpec((n_points, 3), "float32", n)},
          {"points": np.stack(clouds)})
    centres = rng.normal(size=(3, image_dim))
    label = np.array([categories.index(c) for c in cats])
    image = centres[label][:, None, None] + 0.1 * rng.normal(size=(n, views, variants, image_dim))
    write(CacheLayout(cache).image_features, ids, {"features": ArraySpec((views, variants, image_dim), "float16", n)},
          {"features": image.astype(np.float16)})
    text = rng.normal(size=(3, templates, text_dim))
    write(CacheLayout(cache).text_features, categories, {"features": ArraySpec((templates, text_dim), "float16", 3)},
          {"features": text.astype(np.float16)})
    return cache


def convert_command(tmp_path: Path, monkeypatch):
    """The CLI's `convert` command alone as a Typer app, run in ``tmp_path`` (its params.yaml and
    cache): invoke it with ``CliRunner().invoke(app, ["convert", ...])``."""
    import typer

    from cli import convert

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command("convert")(convert)
    app.command("noop")(lambda: None)   # two commands: typer then keeps the command name
    return app
