"""The data stages end to end through the CLI: demo-data, index, render, sample, bad input,
kill-and-resume, --limit, --strict."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.store import open_store, partial_path

runner = CliRunner()
CATEGORIES = ["chair", "mug", "airplane"]


def invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


def add_bad_meshes(root: Path) -> None:
    """Shapes that must fail (recorded, not fatal) next to the good ones, in a plain folder."""
    bad = root / "broken"
    bad.mkdir(parents=True)
    (bad / "empty.obj").write_text("")
    (bad / "nan.obj").write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (bad / "flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    (bad / "truncated.glb").write_bytes(b"glTF\x02\x00\x00\x00\xff\xff")
    (bad / "notes.docx").write_text("not a mesh")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A cache with a tiny demo (3 categories × 3 shapes) plus bad meshes, indexed."""
    work = tmp_path_factory.mktemp("stages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECON_CACHE", str(work / "cache"))
        mp.setenv("RECON_PARAMS", str(work / "params.yaml"))
        yield _make_workdir(work)


def _make_workdir(work: Path) -> Path:
    (work / "params.yaml").write_text(
        "demo: {shapes_per_category: 3, categories: [chair, mug, airplane]}\n"
        "render: {resolution: 64, workers: 1, chunk_rows: 4}\n"
        "sample: {points: 512, workers: 1, chunk_rows: 4}\n")
    meshes = work / "meshes"
    assert invoke("demo-data", str(meshes)).exit_code == 0
    add_bad_meshes(meshes)
    result = invoke("index", str(meshes))
    assert result.exit_code == 0, result.output
    return work


def test_index_table(workdir):
    table = pl.read_parquet(workdir / "cache" / "shapes.parquet")
    assert table.height == 9 + 4
    assert set(table["category"]) == {"chair", "mug", "airplane", "broken"}
    assert set(table["split"]) == {"train", "test"}
    skipped = pl.read_parquet(workdir / "cache" / "failures" / "index.parquet")
    assert skipped["error"].to_list() == ["unsupported"]


def test_render_and_sample_record_failures(workdir):
    cache = workdir / "cache"
    result = invoke("render")
    assert result.exit_code == 0, result.output
    result = invoke("sample", "--workers", "2")
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(cache / "shapes.parquet")
    broken = (table["category"] == "broken").to_numpy()
    for name, array, row_shape in (("renders.zarr", "images", (1, 64, 64, 3)), ("points.zarr", "points", (512, 3))):
        store = open_store(cache / name, expect_ids=table["id"].to_list())
        assert store[array].shape[1:] == row_shape
        np.testing.assert_array_equal(store.ok, ~broken)
    renders = open_store(cache / "renders.zarr")
    good = renders["images"][int(np.flatnonzero(~broken)[0]), 0]
    assert good[0, 0].tolist() == [255, 255, 255] and good.min() < 200  # white background, a shape
    points = open_store(cache / "points.zarr")["points"][0]
    assert points.dtype == np.float32
    assert abs(np.linalg.norm(points, axis=1).max() - 1) < 1e-5
    for stage in ("render", "sample"):
        failures = pl.read_parquet(cache / "failures" / f"{stage}.parquet")
        assert sorted(failures["id"]) == ["broken-empty", "broken-flat", "broken-nan", "broken-truncated"]
        assert set(failures["stage"]) == {stage}
        kinds = dict(zip(failures["id"], failures["error"]))
        assert kinds["broken-nan"] == "nan_vertices" and kinds["broken-flat"] == "zero_area"
    assert (cache / "renders_preview.png").stat().st_size > 1000
    # the failure logs inside the stores are ours: inspecting them raises no warning (zarr's included)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("renders.zarr", "points.zarr"):
            result = invoke("inspect", str(cache / name))
            assert result.exit_code == 0 and "broken-nan" in result.output, result.output
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    # --strict turns recorded failures into a non-zero exit; the store stays valid
    assert invoke("sample", "--strict").exit_code == 1


def test_sample_is_independent_of_worker_count(workdir, tmp_path):
    out = tmp_path / "points1.zarr"
    from stages import sample
    sample.run(sample.SampleParams(points=512, workers=1, chunk_rows=4), out=out)
    a = open_store(out)["points"][:]
    b = open_store(workdir / "cache" / "points.zarr")["points"][:]  # made with 2 workers
    np.testing.assert_array_equal(a, b)


def _stage_subprocess(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from cli import app; sys.argv = ['recon', *sys.argv[1:]]; app()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("stage,store,array", [("sample", "points.zarr", "points"),
                                               ("render", "renders.zarr", "images")])
def test_sigkill_then_resume_equals_uninterrupted(workdir, tmp_path, stage, store, array):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shapes.parquet").write_bytes((workdir / "cache" / "shapes.parquet").read_bytes())
    env = {"RECON_CACHE": str(cache)}
    killed = _stage_subprocess(workdir, stage, "--workers", "1", env={**env, "RECON_KILL_AFTER_ROW": "5"})
    assert killed.returncode == -9, killed.stderr
    partial = partial_path(cache / store)
    assert partial.exists() and not (cache / store).exists()
    with pytest.raises(Exception, match="partial store exists"):
        open_store(cache / store)
    resumed = _stage_subprocess(workdir, stage, "--workers", "1", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr + resumed.stdout
    assert "8/13 rows already done" in " ".join((resumed.stderr + resumed.stdout).split())
    a, b = open_store(cache / store), open_store(workdir / "cache" / store)
    np.testing.assert_array_equal(a[array][:], b[array][:])
    np.testing.assert_array_equal(a.ok, b.ok)
    failures = pl.read_parquet(cache / "failures" / f"{stage}.parquet")
    assert failures.height == 4  # failures recorded before the kill are still reported


def test_limit_leaves_a_resumable_partial_store(workdir, tmp_path):
    from stages import sample
    out = tmp_path / "p.zarr"
    assert not sample.run(sample.SampleParams(points=512, workers=1, chunk_rows=4, limit=3), out=out)
    assert not out.exists() and partial_path(out).exists()
    assert sample.run(sample.SampleParams(points=512, workers=1, chunk_rows=4), out=out)
    assert open_store(out).ok.sum() == 9


def listed_commands(help_text: str) -> list[str]:
    """The command names in the "Commands" panel of a rich ``--help`` (first word of each row)."""
    import re

    panel = help_text.split("─ Commands ", 1)[1].split("╰", 1)[0]
    return [m.group(1) for line in panel.splitlines() if (m := re.match(r"│ (\S+)", line))]


def test_help_lists_every_command_and_every_dvc_stage_command():
    """`recon --help` lists every command and group registered on the Typer app (and each group's
    help its own commands), and every command a dvc.yaml stage runs is one of them."""
    import shlex

    import typer
    import yaml

    from conftest import ROOT

    root = typer.main.get_command(app)
    registered = {name: cmd for name, cmd in root.commands.items() if not cmd.hidden}
    listed = listed_commands(invoke("--help").output)
    assert len(registered) >= 14 and sorted(listed) == sorted(registered)
    for name, group in registered.items():
        if hasattr(group, "commands"):          # a sub-app such as `recon show`
            sub = listed_commands(invoke(name, "--help").output)
            assert sorted(sub) == sorted(n for n, c in group.commands.items() if not c.hidden), name

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    runs = {}
    for stage, spec in stages.items():
        for cmd in [spec["cmd"]] if isinstance(spec["cmd"], str) else spec["cmd"]:
            words = shlex.split(cmd)
            if "recon" in words:
                runs[stage] = words[words.index("recon") + 1:]
    assert "pretrain" in runs and len(runs) >= len(stages) // 2     # the parse found the recon stages
    for stage, args in runs.items():
        assert args and args[0] in listed, f"dvc stage {stage} runs `recon {args[0] if args else ''}`"
        if hasattr(registered[args[0]], "commands"):
            assert args[1] in registered[args[0]].commands, f"dvc stage {stage}: `recon {' '.join(args[:2])}`"


def test_missing_shapes_table_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "nothing"))
    result = invoke("sample")
    assert result.exit_code == 1
    assert "recon index" in result.output


def test_real_meshes_index_render_and_sample(meshes_dir, tmp_path, monkeypatch):
    """The real files in ../shared/data/meshes, laid out as plain <category>/<mesh> folders."""
    import shutil
    root = tmp_path / "real"
    for file in meshes_dir.iterdir():
        stem = file.name.split(".")[0].split(" ")[0]
        (root / stem).mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, root / stem / file.name)
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "none.yaml"))
    assert invoke("index", str(root)).exit_code == 0
    table = pl.read_parquet(tmp_path / "cache" / "shapes.parquet")
    assert sorted(table["id"]) == ["Duck-Duck", "airplane-airplane", "bunny-bunny", "chair_model-chair_model",
                                   "fuze-fuze", "teapot-teapot"]
    assert invoke("render", "--resolution", "64", "--workers", "1").exit_code == 0
    assert invoke("sample", "--workers", "1").exit_code == 0
    renders, points = open_store(tmp_path / "cache" / "renders.zarr"), open_store(tmp_path / "cache" / "points.zarr")
    assert renders.ok.all() and points.ok.all()
    images = renders["images"][:, 0].reshape(len(table), -1, 3).astype(int)
    colourful = (images.max(axis=2) - images.min(axis=2)).mean(axis=1)  # textured/coloured shapes
    duck, fuze = table["id"].to_list().index("Duck-Duck"), table["id"].to_list().index("fuze-fuze")
    assert colourful[duck] > 5 and colourful[fuze] > 2


def test_render_views_option_overrides_params(workdir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shapes.parquet").write_bytes((workdir / "cache" / "shapes.parquet").read_bytes())
    monkeypatch.setenv("RECON_CACHE", str(cache))
    result = invoke("render", "--views", "0,0;90,10", "--resolution", "32", "--limit", "2")
    assert result.exit_code == 0, result.output
    import zarr
    partial = zarr.open_group(partial_path(cache / "renders.zarr"), mode="r")
    assert partial["images"].shape[1:] == (2, 32, 32, 3)
    assert partial.attrs["params"]["views"] == [[0.0, 0.0], [90.0, 10.0]]
    assert int(partial["done"][:].sum()) == 2


def _clone_cache_files(clone: Path) -> dict[str, bytes]:
    cache = clone / "cache"
    names = ["shapes.parquet"] + [str(p.relative_to(cache)) for store in ("renders.zarr", "points.zarr")
                                  for p in sorted((cache / store).rglob("*")) if p.is_file()]
    return {name: (cache / name).read_bytes() for name in names}


def test_the_same_inputs_in_two_clones_give_byte_identical_stores(tmp_path, monkeypatch):
    """index, render and sample of the same demo at two different absolute paths (as `dvc repro`
    runs them: from the clone, with relative paths) write the same bytes, and mesh paths are
    relative to a root recorded once."""
    from pipeline.discover import table_metadata
    from stages import demo_data, index, render, sample
    files = {}
    for clone in (tmp_path / "a", tmp_path / "deeper" / "b"):
        clone.mkdir(parents=True)
        monkeypatch.chdir(clone)
        monkeypatch.setenv("RECON_CACHE", "cache")
        demo_data.run(demo_data.DemoParams(out="cache/demo_meshes", shapes_per_category=2, categories=["mug", "chair"]))
        index.run(index.IndexParams(root="cache/demo_meshes"))
        assert render.run(render.RenderParams(resolution=32, workers=1, chunk_rows=2))
        assert sample.run(sample.SampleParams(points=256, workers=1, chunk_rows=2))
        files[clone] = _clone_cache_files(clone)
        assert open_store(Path("cache/renders.zarr")).ok.all()
    a, b = files.values()
    assert sorted(a) == sorted(b) and len(a) > 10
    assert [name for name in a if a[name] != b[name]] == []
    shapes = Path("cache/shapes.parquet")
    assert table_metadata(shapes)["root"] == "demo_meshes"
    assert not any(p.startswith("/") for p in pl.read_parquet(shapes)["mesh_path"])
    for name, data in a.items():
        assert str(tmp_path).encode() not in data, name


@pytest.mark.parametrize("stage,store", [("sample", "points.zarr"), ("render", "renders.zarr")])
def test_two_processes_write_the_store_one_process_writes(workdir, tmp_path, stage, store):
    """RANK/WORLD_SIZE (torchrun, or a SLURM array job): two concurrent processes share the chunks
    of one store on a shared folder and give, byte for byte, the one-process store (failures too)."""
    caches = {}
    for name in ("one", "two"):
        caches[name] = tmp_path / name / "cache"
        caches[name].mkdir(parents=True)
        (caches[name] / "shapes.parquet").write_bytes((workdir / "cache" / "shapes.parquet").read_bytes())
    code = "import sys; from cli import app; sys.argv = ['recon', *sys.argv[1:]]; app()"
    env = {**os.environ, "RECON_CACHE": str(caches["two"]), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", code, stage, "--workers", "1"], cwd=workdir, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**env, "RANK": str(r)})
             for r in (0, 1)]
    single = _stage_subprocess(workdir, stage, "--workers", "1", env={"RECON_CACHE": str(caches["one"])})
    outputs = [r.communicate(timeout=300)[0] for r in ranks]
    assert single.returncode == 0 and [r.returncode for r in ranks] == [0, 0], outputs
    assert "rank 1/2" in " ".join(outputs).replace("\n", " ")
    a, b = (open_store(caches[n] / store) for n in ("one", "two"))
    assert b.group["done"][:].all() and b.ok.sum() == 9
    files = [{str(p.relative_to(c / store)): p.read_bytes() for p in sorted((c / store).rglob("*")) if p.is_file()}
             for c in caches.values()]
    assert sorted(files[0]) == sorted(files[1]) and "failures.jsonl" in files[0]
    assert [name for name in files[0] if files[0][name] != files[1][name]] == []
    failures = pl.read_parquet(caches["two"] / "failures" / f"{stage}.parquet")
    assert sorted(failures["id"]) == ["broken-empty", "broken-flat", "broken-nan", "broken-truncated"]
