"""Offscreen rendering of mesh files with pyrender (EGL), plus labelled contact sheets.

Camera convention (ShapeNetCore.v2 default pose: up is +Y, the object's front faces -Z):
the scene is centred on its bounding-box centre and scaled into the unit sphere; a
view ``(azimuth_deg, elevation_deg)`` puts the camera on a sphere around the origin
looking at it, with azimuth 0 / elevation 0 straight in front of the object (camera on
the -Z axis), positive azimuth moving the camera towards +X and positive elevation
moving it up. The default view is a front three-quarter view from above,
``(30, 20)``, in which chairs, tables, cars and airplanes read clearly.

Rendering never happens in the caller's process. Mesa's llvmpipe loads its own libLLVM into
the process that makes a GL context; triton (which `torch._dynamo` imports, and every torch
optimizer imports `torch._dynamo`) carries another LLVM, and loading it after Mesa's
segfaults. So `render_views` / `render_scene` hand the work to one spawned render process
(started on first use, reused, stopped by `close_renderer()` or at exit), and a Python
process, a notebook kernel included, can render and then train. Process pools that exist only
to render call `render_in_this_process()` in their initializer and render in place, and so do
daemonic pool workers (which may not start processes).

Where rendering happens, the pyrender `OffscreenRenderer` is created lazily once per process
and resolution and reused. Such a process may still fork: an at-fork hook releases its GL
context first (a Mesa context does not survive fork).
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np  # noqa: E402

if not hasattr(np, "infty"):  # pyrender 0.1.45 still uses np.infty (removed in numpy 2)
    np.infty = np.inf  # type: ignore[attr-defined]

import trimesh  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from pipeline.meshes import MeshError, load_scene, scene_to_mesh  # noqa: E402

__all__ = ["RenderConfig", "render_views", "render_scene", "close_renderer", "render_in_this_process",
           "contact_sheet", "camera_pose", "MeshError"]


@dataclass
class RenderConfig:
    """Camera, light and image settings; `provenance()` is what a store records."""

    resolution: int = 224
    #: (azimuth_deg, elevation_deg) per view; see the module docstring for the convention.
    views: list[tuple[float, float]] = field(default_factory=lambda: [(30.0, 20.0)])
    #: camera distance as a multiple of the distance at which the unit sphere exactly fills the yfov.
    distance_factor: float = 1.05
    yfov_deg: float = 40.0
    #: directional light attached to the camera (so visible faces are lit), pyrender units.
    light_intensity: float = 3.0
    #: second, weaker directional light from above-left of the viewer, fraction of `light_intensity`.
    fill_fraction: float = 0.35
    ambient: float = 0.35
    background: tuple[int, int, int] = (255, 255, 255)
    #: flat shading (face normals) reads CAD-style models best and tolerates bad vertex normals.
    smooth: bool = False

    def provenance(self) -> dict:
        """JSON-serialisable description of the camera/light setup."""
        return {
            "renderer": "pyrender 0.1.45 OffscreenRenderer (EGL)",
            "resolution": self.resolution,
            "views_az_el_deg": [list(map(float, v)) for v in self.views],
            "distance_factor": self.distance_factor,
            "yfov_deg": self.yfov_deg,
            "normalisation": "bbox centre at origin, max vertex norm 1",
            "convention": "ShapeNet v2 pose: +Y up, front -Z; az 0 = camera on -Z, +az towards +X",
            "lights": {
                "camera_directional": self.light_intensity,
                "fill_directional": self.light_intensity * self.fill_fraction,
                "ambient": self.ambient,
            },
            "background": list(self.background),
            "smooth": self.smooth,
        }


_RENDERERS: dict[int, object] = {}
_OWNER_PID = os.getpid()
_RENDER_HERE = False                       # True only in processes that exist to render
_RENDER_PROCESS: ProcessPoolExecutor | None = None
_RENDER_PROCESS_PID = -1                   # the pid that started _RENDER_PROCESS (reset after fork)


def render_in_this_process() -> None:
    """Render in this process from now on (the initializer of rendering-only workers). Such a
    process exits when its parent dies, so a killed stage leaves no renderer behind (nor holds
    its output pipes open)."""
    global _RENDER_HERE
    _RENDER_HERE = True
    if multiprocessing.parent_process() is not None:
        import threading

        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    import time

    while os.getppid() == parent:   # a dead parent's children are re-parented
        time.sleep(0.5)
    os._exit(0)


def _renders_here() -> bool:
    """Whether this process renders itself: a rendering-only process, or a daemonic pool worker
    (which may not start a process of its own)."""
    return _RENDER_HERE or multiprocessing.current_process().daemon


def _render_process() -> ProcessPoolExecutor:
    """The spawned process that does this process's rendering, started on first use."""
    global _RENDER_PROCESS, _RENDER_PROCESS_PID
    if _RENDER_PROCESS is None or _RENDER_PROCESS_PID != os.getpid():
        _RENDER_PROCESS = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=render_in_this_process)
        _RENDER_PROCESS_PID = os.getpid()
    return _RENDER_PROCESS


def _in_render_process(fn, *args):
    """``fn(*args)`` in the render process: its result, its exception, its warnings re-issued here."""
    global _RENDER_PROCESS
    try:
        result, caught = _render_process().submit(_with_warnings, fn, *args).result()
    except BrokenProcessPool as err:
        _RENDER_PROCESS = None   # the next call starts a fresh one
        raise RuntimeError(f"the render process died while rendering {args[0]!r} "
                           "(a crash in the GL driver?); the next call starts a new one") from err
    for category, message in caught:
        warnings.warn(message, category, stacklevel=3)
    return result


def _with_warnings(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args)
    return result, [(w.category, str(w.message)) for w in caught]


def _renderer(resolution: int):
    """The process-wide OffscreenRenderer for `resolution`, created on first use.

    A forked child never reuses its parent's GL context: the cache is reset on pid change.
    """
    global _OWNER_PID
    if _OWNER_PID != os.getpid():
        _RENDERERS.clear()
        _OWNER_PID = os.getpid()
    renderer = _RENDERERS.get(resolution)
    if renderer is None:
        import pyrender

        renderer = pyrender.OffscreenRenderer(resolution, resolution)
        _RENDERERS[resolution] = renderer
    return renderer


def close_renderer() -> None:
    """Free every renderer: this process's OffscreenRenderers and its render process."""
    global _RENDER_PROCESS
    if _RENDER_PROCESS is not None and _RENDER_PROCESS_PID == os.getpid():
        _RENDER_PROCESS.shutdown()
    _RENDER_PROCESS = None
    _close_local_renderers()


def _close_local_renderers() -> None:
    """Delete every cached OffscreenRenderer of this process."""
    while _RENDERERS:
        _, renderer = _RENDERERS.popitem()
        try:
            renderer.delete()
            from OpenGL.EGL import eglReleaseThread

            eglReleaseThread()  # drop the current context so the display really terminates
        except Exception:  # context may already be gone at interpreter exit
            pass


# A GL context does not survive fork() (Mesa's llvmpipe threads are gone in the child and
# the first render deadlocks), so free the parent's renderers before any fork; they are
# recreated lazily on the next call. Spawned workers are unaffected.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_local_renderers)


def camera_pose(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """4x4 camera-to-world pose looking at the origin (OpenGL: camera looks along its -Z)."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    eye = distance * np.array([np.cos(el) * np.sin(az), np.sin(el), -np.cos(el) * np.cos(az)])
    back = eye / np.linalg.norm(eye)  # camera +Z points away from the target
    up = np.array([0.0, 1.0, 0.0])
    if abs(np.dot(up, back)) > 0.999:  # straight down/up: continue the front view's "up"
        up = np.array([0.0, 0.0, 1.0 if back[1] > 0 else -1.0])
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    true_up = np.cross(back, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, true_up, back, eye
    return pose


def _normalising_transform(scene: trimesh.Scene) -> np.ndarray:
    """Transform moving the scene's bbox centre to the origin and its max vertex norm to 1."""
    vertices = scene_to_mesh(scene).vertices
    centre = (vertices.min(axis=0) + vertices.max(axis=0)) / 2.0
    radius = float(np.linalg.norm(vertices - centre, axis=1).max())
    transform = np.eye(4)
    transform[:3, :3] /= radius if radius > 0 else 1.0
    transform[:3, 3] = -centre / (radius if radius > 0 else 1.0)
    return transform


def _to_pyrender_mesh(geom: trimesh.Trimesh, smooth: bool):
    """Convert one trimesh geometry (textures, vertex/face colours, materials) to pyrender."""
    import pyrender

    if geom.visual.kind == "face":
        smooth = False
    try:
        return pyrender.Mesh.from_trimesh(geom, smooth=smooth)
    except Exception:
        # unusual visuals (e.g. broken UVs): fall back to plain geometry
        return pyrender.Mesh.from_trimesh(trimesh.Trimesh(geom.vertices, geom.faces, process=False), smooth=smooth)


def _build_scene(scene: trimesh.Scene, cfg: RenderConfig):
    import pyrender

    bg = np.array([*(c / 255.0 for c in cfg.background), 1.0], dtype=np.float64)
    ambient = np.full(3, cfg.ambient, dtype=np.float64)
    pr_scene = pyrender.Scene(bg_color=bg, ambient_light=ambient)
    root = _normalising_transform(scene)
    meshes = {name: _to_pyrender_mesh(g, cfg.smooth) for name, g in scene.geometry.items()}
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        if name in meshes:
            pr_scene.add(meshes[name], pose=root @ transform)
    return pr_scene


def render_scene(scene: trimesh.Scene, cfg: RenderConfig | None = None) -> np.ndarray:
    """Render an already loaded (validated) scene: uint8 RGB [V, H, W, 3] (in the render process)."""
    if not _renders_here():
        return _in_render_process(render_scene, scene, cfg)
    import pyrender

    cfg = cfg or RenderConfig()
    pr_scene = _build_scene(scene, cfg)
    yfov = np.radians(cfg.yfov_deg)
    distance = cfg.distance_factor / np.sin(yfov / 2.0)
    camera = pyrender.PerspectiveCamera(yfov=yfov, znear=max(distance - 1.5, 0.05), zfar=distance + 1.5)
    cam_node = pr_scene.add(camera, pose=np.eye(4))
    key = pr_scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=cfg.light_intensity), pose=np.eye(4))
    fill = pr_scene.add(
        pyrender.DirectionalLight(color=np.ones(3), intensity=cfg.light_intensity * cfg.fill_fraction),
        pose=np.eye(4),
    )
    renderer = _renderer(cfg.resolution)
    flags = pyrender.RenderFlags.SKIP_CULL_FACES
    out = np.empty((len(cfg.views), cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    for i, (az, el) in enumerate(cfg.views):
        pose = camera_pose(az, el, distance)
        pr_scene.set_pose(cam_node, pose)
        pr_scene.set_pose(key, pose)
        pr_scene.set_pose(fill, camera_pose(az - 60.0, min(el + 45.0, 85.0), distance))
        color, _ = renderer.render(pr_scene, flags=flags)
        out[i] = color[..., :3]
    return out


def render_views(path: str | os.PathLike, cfg: RenderConfig | None = None) -> np.ndarray:
    """Load a mesh file (raises MeshError for bad meshes) and render every view of `cfg` (in the
    render process)."""
    if not _renders_here():
        return _in_render_process(render_views, path, cfg)
    return render_scene(load_scene(path), cfg)


def contact_sheet(images: list[np.ndarray], labels: list[str], columns: int = 8,
                  tile: int | None = None) -> Image.Image:
    """A labelled grid of HxWx3 uint8 images (white background, default PIL font); ``tile`` scales
    every image to that many pixels a side first (keeps a large grid on a screen)."""
    if not images:
        raise ValueError("no images")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    pictures = [Image.fromarray(np.asarray(im, dtype=np.uint8)[..., :3]) for im in images]
    if tile:
        pictures = [p.resize((tile, tile), Image.Resampling.BILINEAR) for p in pictures]
    columns = max(1, min(columns, len(pictures)))
    rows = -(-len(pictures) // columns)
    h = max(p.height for p in pictures)
    w = max(p.width for p in pictures)
    label_h = 14
    sheet = Image.new("RGB", (columns * w, rows * (h + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (picture, label) in enumerate(zip(pictures, labels)):
        x, y = (i % columns) * w, (i // columns) * (h + label_h)
        sheet.paste(picture, (x, y))
        draw.text((x + 2, y + h + 1), str(label), fill=(0, 0, 0), font=font)
    return sheet
