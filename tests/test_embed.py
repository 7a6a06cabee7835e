"""The embed stage: stored features equal a direct forward, variants, resume after SIGKILL,
2-process sharding equals one process, and `recon inspect` on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import ROOT, write_synthetic_cache
from pipeline.store import ArraySpec, StoreWriter, open_store, partial_path

IMAGE_TEACHER = "timm:test_vit"   # a tiny timm architecture, random weights: fast and offline
PARAMS = ("embed:\n  image_teacher: timm:test_vit\n  image_weights: random\n  text_teacher: minilm\n"
          "  batch_size: 8\n  chunk_rows: 4\n  device: cpu\n")


def write_renders(cache: Path, size: int = 48) -> None:
    """Random-but-structured RGB views for the synthetic shapes (one failed render)."""
    ids = pl.read_parquet(cache / "shapes.parquet")["id"].to_list()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(ids), 1, size, size, 3), dtype=np.uint8)
    ok = np.ones(len(ids), dtype=bool)
    ok[2] = False
    images[2] = 0
    writer = StoreWriter.open(cache / "renders.zarr", ids, {"images": ArraySpec((1, size, size, 3), "uint8", 4)},
                              {"resolution": size})
    for block in writer.pending_blocks():
        writer.write_rows(block, {"images": images[block]}, ok[block])
    writer.finalise()


@pytest.fixture
def cache(tmp_path) -> Path:
    cache = write_synthetic_cache(tmp_path / "cache")
    for store in ("image.zarr", "text.zarr"):  # the synthetic teacher stores are replaced here
        import shutil
        shutil.rmtree(cache / "teachers" / store)
    write_renders(cache)
    (tmp_path / "params.yaml").write_text(PARAMS)
    return cache


def _run(tmp_path: Path, *args: str, env: dict | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    script = tmp_path / "run_cli.py"
    script.write_text("import sys\nfrom cli import app\nsys.argv = ['recon', *sys.argv[1:]]\napp()\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                "--master_port", "29541"] if torchrun else [sys.executable]
    return subprocess.run([*launcher, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RECON_CACHE": str(tmp_path / "cache"),
                                            "RECON_PARAMS": str(tmp_path / "params.yaml"),
                                            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})


def _embed(cache: Path, **overrides):
    from stages import embed
    values = dict(image_teacher=IMAGE_TEACHER, image_weights="random", text_teacher="minilm",
                  batch_size=8, chunk_rows=4, device="cpu")
    params = embed.EmbedParams(**{**values, **overrides})
    return embed.run(params, shapes=cache / "shapes.parquet", renders=cache / "renders.zarr",
                     out_dir=cache / "teachers")


def test_stores_layout_and_text_features_equal_a_direct_forward(cache):
    from pipeline.prompts import templates
    from pipeline.teachers import load_teacher

    _embed(cache)
    store = open_store(cache / "teachers" / "image.zarr")
    assert store["features"].shape[1:3] == (1, 1) and store["features"].dtype == np.float16
    assert not store.ok[2] and store.ok.sum() == 11  # the failed render is excluded
    assert store.provenance["teacher"]["weights"] == "random"
    assert store.provenance["renders_store"] == "../renders.zarr"  # relative: no clone path in a store
    text = open_store(cache / "teachers" / "text.zarr")
    assert text.ids.tolist() == ["ball", "box", "can"]
    assert text["features"].shape == (3, 60, 384)
    assert list(text["templates"][:]) == templates()
    direct = load_teacher("minilm", "text").encode_texts([templates()[7].format("box")]).numpy()[0]
    np.testing.assert_allclose(text["features"][1, 7].astype(np.float32), direct, atol=2e-3)


def test_local_weights_give_the_direct_forward(cache, tmp_path):
    import torch

    from pipeline.teachers import load_teacher

    torch.manual_seed(0)
    reference = load_teacher(IMAGE_TEACHER, "image", "random")
    weights = tmp_path / "vit.pth"
    torch.save(reference.module.state_dict(), weights)
    _embed(cache, image_weights=str(weights))
    store = open_store(cache / "teachers" / "image.zarr")
    images = open_store(cache / "renders.zarr")["images"][:, 0]
    direct = reference.encode_images(images).numpy()
    stored = store["features"][:, 0, 0].astype(np.float32)
    np.testing.assert_allclose(stored[store.ok], direct[store.ok], rtol=2e-3, atol=2e-3)
    assert store.provenance["teacher"]["weights"].startswith("sha256:")


def test_augmented_variants_are_deterministic_and_distinct(cache, tmp_path):
    _embed(cache, variants=3)
    first = open_store(cache / "teachers" / "image.zarr")["features"][:]
    assert first.shape[1:3] == (1, 3)
    ok = open_store(cache / "teachers" / "image.zarr").ok
    assert not np.allclose(first[ok][:, 0, 1], first[ok][:, 0, 2])
    assert not np.allclose(first[ok][:, 0, 0], first[ok][:, 0, 1])


def test_resume_after_sigkill_and_two_process_sharding(cache, tmp_path):
    single = tmp_path / "single"
    import shutil
    shutil.copytree(cache, single / "cache")
    (single / "params.yaml").write_text(PARAMS)
    weights = tmp_path / "vit.pth"
    import torch

    from pipeline.teachers import load_teacher
    torch.manual_seed(0)
    torch.save(load_teacher(IMAGE_TEACHER, "image", "random").module.state_dict(), weights)
    for folder in (tmp_path, single):
        (folder / "params.yaml").write_text(PARAMS.replace("image_weights: random", f"image_weights: {weights}"))

    killed = _run(single, "embed", env={"RECON_KILL_AFTER_ROW": "5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert partial_path(single / "cache" / "teachers" / "image.zarr").exists()
    resumed = _run(single, "embed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in " ".join((resumed.stdout + resumed.stderr).split())

    sharded = _run(tmp_path, "embed", torchrun=2)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a = open_store(single / "cache" / "teachers" / "image.zarr")
    b = open_store(cache / "teachers" / "image.zarr")
    np.testing.assert_array_equal(a["features"][:], b["features"][:])
    np.testing.assert_array_equal(a.ok, b.ok)


def test_inspect_reports_counts_and_knn(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache")
    result = CliRunner().invoke(app, ["inspect", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.output)
    image = next(r for r in reports if r["store"].endswith("image.zarr"))
    sanity = image["teacher_sanity"]
    assert sanity["knn5_accuracy"] == 1.0  # the synthetic features separate the 3 categories
    assert sanity["cosine_within"] > sanity["cosine_between"]
    assert sum(c["shapes"] for c in image["counts"]) == 12
    text = next(r for r in reports if r["store"].endswith("text.zarr"))
    assert text["rows"] == 3
    table = CliRunner().invoke(app, ["inspect", str(cache / "teachers" / "image.zarr")])
    assert "knn5_accuracy" in table.output and "1.0000" in table.output
    out = tmp_path / "image.parquet"
    assert CliRunner().invoke(app, ["inspect", str(cache / "teachers" / "image.zarr"), "--parquet", str(out)]).exit_code == 0
    frame = pl.read_parquet(out)
    assert frame.columns[:3] == ["id", "category", "split"] and frame.height == 12


def test_bf16_precision_is_close_and_recorded(cache, tmp_path):
    import torch

    from pipeline.teachers import load_teacher

    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(load_teacher(IMAGE_TEACHER, "image", "random").module.state_dict(), weights)
    _embed(cache, image_weights=str(weights), precision="fp32")
    fp32 = open_store(cache / "teachers" / "image.zarr")["features"][:].astype(np.float32)
    _embed(cache, image_weights=str(weights), precision="bf16")  # other params: the store is rebuilt
    store = open_store(cache / "teachers" / "image.zarr")
    bf16 = store["features"][:].astype(np.float32)
    assert store.params["precision"] == "bf16"
    ok = store.ok
    assert not np.array_equal(bf16[ok], fp32[ok])
    cosine = (bf16[ok] * fp32[ok]).sum(-1) / (np.linalg.norm(bf16[ok], axis=-1) * np.linalg.norm(fp32[ok], axis=-1))
    assert cosine.min() > 0.99


def test_descriptions_by_synset_id_reach_the_text_store(cache, tmp_path):
    shapes = pl.read_parquet(cache / "shapes.parquet")
    synset = {"ball": "02880940", "box": "02933112", "can": "02946921"}
    shapes.with_columns(pl.col("category").replace(synset).alias("synset")).write_parquet(cache / "shapes.parquet")
    unmatched = tmp_path / "other.json"
    unmatched.write_text(json.dumps([{"catalogue": 2691156, "describe": "an aircraft"}]))
    with pytest.raises(ValueError, match="names a category or synset id"):
        _embed(cache, descriptions=str(unmatched))
    records = tmp_path / "described.json"          # reference-style records keyed by integer synset id
    records.write_text(json.dumps([{"catalogue": 2933112, "describe": "a cupboard with doors"}]))
    _embed(cache, descriptions=str(records))
    text = open_store(cache / "teachers" / "text.zarr")
    assert list(text["texts"][:]) == ["ball", "a cupboard with doors", "can"]
    assert text.params["texts"] == ["ball", "a cupboard with doors", "can"]
