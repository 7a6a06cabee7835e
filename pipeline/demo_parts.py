"""Per-point part labels for the procedural demo shapes, as a part-segmentation store.

The demo generator (``pipeline/demo.py``) already writes every part as its own OBJ object,
``o <part>_<k>`` (e.g. ``o seat_0``, ``o leg_3``). This module reads those object names back
from the files, so the demo meshes stay byte for byte what they were: each face gets the raw
part name of its object, `DEMO_PARTS` groups raw names into a few semantic parts per category
(as ShapeNetPart does: a chair has back, seat, leg, arm), surface samples carry the part of the
face they lie on, and ``pipeline.partseg_store.write_partseg_store`` writes the store.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import trimesh

from pipeline import layout
from pipeline.convert import SPLITS, ConvertResult
from pipeline.meshes import validate_mesh
from pipeline.partseg_store import PartSample, write_partseg_store
from pipeline.sampling import sample_surface_faces, shape_seed

#: synset → {semantic part: raw part names the generator gives its objects}, in part order.
#: Category order (and so the global part ids) is that of the store's sorted class names.
DEMO_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "03001627": {"back": ("back", "post", "toprail", "slat"), "seat": ("seat",),            # chair
                 "leg": ("leg", "column", "foot", "side", "rail"), "arm": ("arm", "armpost")},
    "04379243": {"top": ("top", "apron"), "shelf": ("shelf",),                              # table
                 "leg": ("leg", "column", "base", "foot", "panel", "stretcher")},
    "02828884": {"seat": ("slat",), "leg": ("leg", "slab"), "back": ("backslat", "backpost")},  # bench
    "04256520": {"seat": ("seatcushion", "chaise"), "base": ("base",), "back": ("back", "backcushion"),  # sofa
                 "arm": ("arm",), "leg": ("leg",)},
    "03636649": {"base": ("base",), "stem": ("pole", "arm", "joint"), "shade": ("shade",)},  # lamp
    "02876657": {"body": ("body", "shoulder", "label"), "neck": ("neck",), "cap": ("cap",)},  # bottle
    "03797390": {"body": ("body", "bottom"), "handle": ("handle",)},                         # mug
    "02691156": {"body": ("fuselage",), "wing": ("wing",), "tail": ("fin", "stabiliser"),    # airplane
                 "engine": ("engine",)},
    "02958343": {"body": ("body", "spoiler"), "cabin": ("cabin",), "roof": ("roof",),        # car
                 "wheel": ("wheel",)},
    "02747177": {"body": ("body", "wall", "bottom"), "lid": ("lid",), "fitting": ("pedal", "wheel")},  # ashcan
    "02871439": {"frame": ("side", "back"), "shelf": ("shelf",), "book": ("book",)},         # bookshelf
    "03211117": {"screen": ("screen",), "frame": ("panel", "backbox"), "stand": ("neck", "foot")},  # display
}
_OBJECT_SUFFIX = re.compile(r"_\d+$")


def raw_part_name(object_name: str) -> str:
    """``leg_3`` → ``leg`` (the generator numbers its objects)."""
    return _OBJECT_SUFFIX.sub("", object_name)


def read_obj_parts(path: str | Path) -> tuple[trimesh.Trimesh, list[str]]:
    """A demo OBJ as one mesh plus the raw part name of every face.

    Reads the generator's own format (``o``, ``usemtl``, ``v x y z``, ``f a b c`` with 1-based
    vertex indices); a face before any ``o`` line or a non-triangle face is a ValueError.
    """
    objects: list[str] = []
    vertices: list[str] = []
    faces: list[str] = []
    face_object: list[int] = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("v "):
            vertices.append(line[2:])
        elif line.startswith("f "):
            if not objects:
                raise ValueError(f"{Path(path).name}: a face comes before any 'o <part>' line")
            faces.append(re.sub(r"/\S*", "", line[2:]))
            face_object.append(len(objects) - 1)
        elif line.startswith("o "):
            objects.append(raw_part_name(line[2:].strip()))
    v = np.asarray(" ".join(vertices).split(), dtype=np.float64)
    f = np.asarray(" ".join(faces).split(), dtype=np.int64)
    if v.size % 3 or f.size != 3 * len(faces):
        raise ValueError(f"{Path(path).name}: expected 'v x y z' lines and triangular 'f a b c' faces")
    v, f = v.reshape(-1, 3), f.reshape(-1, 3) - 1
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(f"{Path(path).name}: face indices out of range")
    mesh = trimesh.Trimesh(v, f, process=False)
    validate_mesh(mesh, path)
    return mesh, [objects[i] for i in face_object]


def part_index(synset: str) -> dict[str, int]:
    """Raw part name → index of its semantic part within the category (0 .. parts - 1)."""
    if synset not in DEMO_PARTS:
        raise ValueError(f"no demo part table for synset {synset!r} (known: {sorted(DEMO_PARTS)})")
    return {raw: k for k, group in enumerate(DEMO_PARTS[synset].values()) for raw in group}


def sample_parts(path: str | Path, synset: str, part_ids: list[int], n_points: int, seed: int,
                 shape_id: str) -> np.ndarray:
    """[n_points, 7] ``x y z nx ny nz part``: area-weighted surface samples (unit sphere, seeded
    with ``shape_seed(seed, shape_id)`` as the sample stage), their face normals, and the global
    part id (``part_ids[semantic part]``) of the face each lies on."""
    mesh, face_parts = read_obj_parts(path)
    lookup = part_index(synset)
    unknown = sorted(set(face_parts) - set(lookup))
    if unknown:
        raise ValueError(f"raw parts {unknown} are not in DEMO_PARTS[{synset!r}]")
    face_part = np.asarray([part_ids[lookup[name]] for name in face_parts], dtype=np.float32)
    points, face = sample_surface_faces(mesh, n_points, shape_seed(seed, shape_id))
    normals = np.asarray(mesh.face_normals, dtype=np.float32)[face]
    return np.concatenate([points, normals, face_part[face, None]], axis=1)


def demo_part_samples(shapes_path: str | Path, n_points: int, seed: int = 0
                      ) -> tuple[list[PartSample], list[str], list[list[int]], list[str], dict[str, list[str]]]:
    """Samples of every row of ``shapes.parquet`` with categories sorted by name (as the
    classification store of ``convert points``): (samples, class names, the global part ids of
    each category, splits, the semantic part names of each category)."""
    import polars as pl

    from pipeline.discover import resolve_mesh_paths

    shapes = resolve_mesh_paths(pl.read_parquet(shapes_path), Path(shapes_path))  # paths are root-relative
    synset_of = dict(zip(shapes["category"], shapes["synset"]))
    names = sorted(synset_of)
    missing = [f"{n} ({synset_of[n]})" for n in names if synset_of[n] not in DEMO_PARTS]
    if missing:
        raise ValueError(f"no demo part table for categories {missing}: part labels exist only for "
                         f"the procedural demo set")
    part_names = {n: list(DEMO_PARTS[synset_of[n]]) for n in names}
    category_parts, start = [], 0
    for n in names:
        category_parts.append(list(range(start, start + len(part_names[n]))))
        start += len(part_names[n])
    present = set(shapes["split"].to_list())
    splits = [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))
    label = {n: i for i, n in enumerate(names)}

    def load(path: str, synset: str, category: str, shape_id: str) -> np.ndarray:
        return sample_parts(path, synset, category_parts[label[category]], n_points, seed, shape_id)

    samples = [PartSample(sid, split, label[cat], lambda a=(path, syn, cat, sid): load(*a))
               for sid, syn, cat, split, path in shapes.select(["id", "synset", "category", "split",
                                                                  "mesh_path"]).iter_rows()]
    return samples, names, category_parts, splits, part_names


def convert_demo_parts(cache: str | Path, out: str | Path, n_points: int = 2048, seed: int = 0,
                       chunk_rows: int = 16, log=print) -> ConvertResult:
    """``cache/shapes.parquet`` of the demo meshes → a part-segmentation store."""
    shapes_path = layout.CacheLayout(cache).shapes
    if not shapes_path.exists():
        raise FileNotFoundError(f"{shapes_path} not found: run the demo-data and index stages first")
    samples, names, parts, splits, part_names = demo_part_samples(shapes_path, n_points, seed)
    return write_partseg_store(out, samples, names, parts, n_points,
                               {"format": "demo-parts", "part_names": part_names},
                               {"source": str(cache), "part_table": "pipeline/demo_parts.py DEMO_PARTS"},
                               splits, seed, "subset", chunk_rows, log)
