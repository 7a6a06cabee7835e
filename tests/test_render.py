"""Offscreen rendering: shapes, background, textures, colours, determinism, contact sheet."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trimesh

from conftest import shared_dir
from pipeline.meshes import MeshError, MissingAssetWarning
from pipeline.render import RenderConfig, close_renderer, contact_sheet, render_views

MESHES = shared_dir() / "data" / "meshes"
needs_shared = pytest.mark.skipif(not MESHES.is_dir(), reason="shared test meshes not available")
CFG = RenderConfig(resolution=96)


@pytest.fixture(scope="module")
def box_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("render") / "box.ply"
    mesh = trimesh.creation.box([1.0, 0.6, 0.4])
    mesh.visual.face_colors = [200, 40, 40, 255]
    mesh.export(path)
    return path


def test_shape_dtype_background(box_path: Path) -> None:
    cfg = RenderConfig(resolution=64, views=[(30.0, 20.0), (0.0, 0.0), (180.0, -30.0), (0.0, 90.0)])
    images = render_views(box_path, cfg)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    for im in images:
        assert (im[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all()  # white corners
        assert (im < 250).any(axis=-1).mean() > 0.05  # the object is visible


def test_default_config() -> None:
    cfg = RenderConfig()
    assert cfg.resolution == 224 and cfg.views == [(30.0, 20.0)] and cfg.background == (255, 255, 255)
    assert cfg.provenance()["views_az_el_deg"] == [[30.0, 20.0]]


def test_deterministic(box_path: Path) -> None:
    a = render_views(box_path, CFG)
    close_renderer()  # a fresh renderer gives the same pixels too
    assert np.array_equal(a, render_views(box_path, CFG))
    assert np.array_equal(a, render_views(box_path, CFG))


def test_fork_pool_after_parent_rendered(box_path: Path) -> None:
    ref = render_views(box_path, CFG)  # the parent has a render process before forking
    with mp.get_context("fork").Pool(2) as pool:  # daemonic workers: they render in place
        images = pool.map_async(partial(render_views, cfg=CFG), [box_path] * 2).get(timeout=60)
    assert all(np.array_equal(im, ref) for im in images)
    assert np.array_equal(render_views(box_path, CFG), ref)


def llvm_libraries(pid: int | str = "self") -> set[str]:
    """The LLVM shared libraries mapped into a process (Mesa's llvmpipe brings one)."""
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "LLVM" in line}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_rendering_keeps_gl_out_of_the_caller(box_path: Path) -> None:
    """The caller's process never loads the GL driver's LLVM (triton's LLVM would crash beside it);
    the render process does, and close_renderer() stops it."""
    import pipeline.render as R

    before = llvm_libraries()
    render_views(box_path, CFG)
    assert llvm_libraries() == before
    (child,) = R._RENDER_PROCESS._processes.values()
    assert any("libLLVM" in lib for lib in llvm_libraries(child.pid))   # llvmpipe, in the child
    close_renderer()
    assert R._RENDER_PROCESS is None and not child.is_alive()


def test_a_rendering_process_may_fork(box_path: Path, tmp_path: Path) -> None:
    """A process that renders in place (a pool worker) holds a GL context; forking it still works
    (the at-fork hook frees the context). Run in a fresh interpreter: this one must stay GL-free."""
    import subprocess
    import sys

    from conftest import ROOT
    script = (
        "import sys, multiprocessing as mp, numpy as np\n"
        "from functools import partial\n"
        "from pipeline.render import RenderConfig, render_in_this_process, render_views\n"
        "render_in_this_process()\n"
        "cfg = RenderConfig(resolution=64)\n"
        "ref = render_views(sys.argv[1], cfg)\n"
        "with mp.get_context('fork').Pool(2) as pool:\n"
        "    images = pool.map_async(partial(render_views, cfg=cfg), [sys.argv[1]] * 2).get(timeout=60)\n"
        "assert all(np.array_equal(im, ref) for im in images)\n"
        "assert np.array_equal(render_views(sys.argv[1], cfg), ref)\n"
        "print('forked ok', int((ref < 250).any(-1).sum()))\n")
    result = subprocess.run([sys.executable, "-c", script, str(box_path)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("forked ok") and int(result.stdout.split()[-1]) > 200


def test_face_colours(box_path: Path) -> None:
    im = render_views(box_path, CFG)[0].astype(int)
    fg = im[(im < 250).any(axis=-1)]
    assert (fg[:, 0] > fg[:, 1] + 40).mean() > 0.9  # red box renders red


def test_vertex_colours(tmp_path: Path) -> None:
    mesh = trimesh.creation.icosphere(2)
    mesh.visual.vertex_colors = [30, 180, 40, 255]
    mesh.export(tmp_path / "green.ply")
    im = render_views(tmp_path / "green.ply", CFG)[0].astype(int)
    fg = im[(im < 250).any(axis=-1)]
    assert (fg[:, 1] > fg[:, 0] + 40).mean() > 0.9


def test_bad_mesh_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(MeshError) as info:
        render_views(tmp_path / "bad.obj", CFG)
    assert info.value.kind == "nan_vertices"


@needs_shared
def test_texture_changes_pixels(tmp_path: Path) -> None:
    textured = render_views(MESHES / "fuze.obj", CFG).astype(float)
    for name in ("fuze.obj", "fuze.obj.mtl"):
        shutil.copy(MESHES / name, tmp_path / name)
    with pytest.warns(MissingAssetWarning, match="fuze uv.jpg"):
        plain = render_views(tmp_path / "fuze.obj", CFG).astype(float)
    assert np.abs(textured - plain).mean() > 5.0


@needs_shared
def test_duck_colour() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingAssetWarning)
        im = render_views(MESHES / "Duck.glb", CFG)[0].astype(int)
    fg = im[(im < 245).any(axis=-1)]
    assert len(fg) > 0.1 * im.shape[0] * im.shape[1]
    saturation = fg.max(axis=1) - fg.min(axis=1)
    assert np.median(saturation) > 60  # yellow duck, not grey


def test_contact_sheet() -> None:
    images = [np.full((40, 50, 3), i * 20, dtype=np.uint8) for i in range(7)]
    sheet = contact_sheet(images, [f"shape {i}" for i in range(7)], columns=3)
    assert sheet.mode == "RGB" and sheet.size[0] == 150
    assert sheet.size[1] >= 3 * 40 and sheet.size[1] < 3 * 70
    with pytest.raises(ValueError):
        contact_sheet(images, ["x"], columns=3)


def test_contact_sheet_scales_tiles() -> None:
    images = [np.full((224, 224, 3), i * 20, dtype=np.uint8) for i in range(6)]
    sheet = contact_sheet(images, [str(i) for i in range(6)], columns=3, tile=64)
    assert sheet.size == (3 * 64, 2 * (64 + 14))
    assert sheet.getpixel((64 + 30, 30)) == (20, 20, 20)          # the second image, scaled


def test_renders_preview_fits_a_screen_for_many_categories(tmp_path: Path) -> None:
    """69 categories (as a real corpus) give a sample of 12 rows, spread over the sorted names,
    labelled by shape id (not a file stem), on a sheet a screen shows whole."""
    import polars as pl

    from pipeline.store import ArraySpec, StoreWriter
    from stages.render import write_preview

    categories = [f"Class{c:02d}" for c in range(69)]
    ids = [f"{c}-m{c[-2:]}{k}" for c in categories for k in range(5)]
    table = pl.DataFrame({"id": ids, "category": [i.split("-")[0] for i in ids]})
    images = np.stack([np.full((1, 32, 32, 3), (n * 7) % 250, np.uint8) for n in range(len(ids))])
    writer = StoreWriter.open(tmp_path / "renders.zarr", ids, {"images": ArraySpec((1, 32, 32, 3), "uint8", 16)}, {})
    ok = np.ones(len(ids), bool)
    ok[0] = False                                                 # a failed shape is never shown
    for block in writer.pending_blocks():
        writer.write_rows(block, {"images": images[block]}, ok[block])
    writer.finalise()
    png = write_preview(tmp_path / "renders.zarr", table, tmp_path / "preview.png", per_category=4)
    from PIL import Image

    with Image.open(png) as sheet:
        assert sheet.size == (4 * 128, 12 * (128 + 14))           # 512 x 1704 px
        assert sheet.getpixel((64, 64)) == (7, 7, 7)               # row 1: Class00's first ok shape (#1)
    from stages.render import preview_label
    assert preview_label("Class00", "Class00-m001", 128) == "Class00 m001"
    assert preview_label("airplane", "02691156-1a04e3eab45ca15dd86060f189eb133", 128) == "airplane 1a04e3eab45…"   # 21 characters
