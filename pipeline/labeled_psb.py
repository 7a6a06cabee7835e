"""Reading the Labeled PSB segmentation benchmark (LabeledDB) into a classification or a
part-segmentation store.

The data (academic use: fetched by hand, never committed) is a folder ``LabeledDB_new`` with
one sub-folder per class (19 × 20 meshes: Airplane, Ant, ..., Vase), and in it ``<n>.off``
(a triangle mesh in standard OFF) beside ``<n>_labels.txt``:

    body                     <- a part name: one token, not all digits
    1 2 3 4 8 10 229 ...     <- 1-based indices of that part's faces (the OFF's face order);
    wing                        the list may run over several lines
    261 262 263 ...

Rules, strict and each failing with the file named (the shape becomes a failure row, the rest of
the conversion goes on):

- every face index is an integer in ``1 .. faces`` of the OFF header (0 or more is an error: the
  indices are 1-based);
- every face is in exactly one part: a face listed under two part names, or a face listed under
  none, is an error (the store has no "unlabelled" part, and a guessed part would be a wrong
  label; the real corpus has neither, see ``docs/labeled-psb.md``); a face listed twice under the
  same name, or a part name repeated, is harmless and merged;
- the mesh is loaded without any reprocessing (``pipeline.meshes.load_mesh``: trimesh,
  ``process=False``), and its triangle count must equal the header's face count (trimesh splits
  polygons into triangles and reads short files without complaint: either would shift the face
  order the labels refer to).

Points: ``n_points`` area-weighted surface samples (``pipeline.sampling.sample_surface_faces``,
seeded with ``shape_seed(seed, shape id)`` as the sample stage), each carrying the part and the
normal of the face it lies on, centred on their centroid and scaled to max norm 1 (the unit
sphere of ``points.zarr``). Both stores hold the same samples of a shape (the part store in the
seeded order of ``pipeline.partseg_store.choose_points``).

Parts: each class's vocabulary is the **sorted** set of part names its label files use (not the
first-seen order: the files of one class list their parts in up to 18 different orders); global
part ids run class by class over the sorted class names (Airplane 0..4, Ant 5..9, ...), the
``category_parts`` scheme of ShapeNetPart's 16 categories / 50 parts.

Split: one seeded split stratified by class (``pipeline.discover.seeded_split``, the index
stage's rule: ``round(test_fraction × class size)`` test shapes per class, at least one of each
split), a pure function of (shape ids, classes, ``test_fraction``, ``seed``), so the classification
and the part store of the same folder hold the same split. Rows: the train shapes, then the test
shapes, each by class name and mesh number; ids are ``<Class>-<n>`` (e.g. ``Airplane-61``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.convert import SPLITS, ConvertResult, Sample, write_classification_store
from pipeline.discover import seeded_split
from pipeline.meshes import load_mesh
from pipeline.partseg_store import PartSample, write_partseg_store
from pipeline.sampling import sample_surface_faces, shape_seed

FORMATS = ("labeled-psb", "labeled-psb-parts")   # the `recon convert` formats of this dataset
FOLDER = "LabeledDB_new"
LABELS_SUFFIX = "_labels.txt"
NORMALISATION = "unit sphere over the shape's surface samples (centroid, max norm 1)"
_INDICES = re.compile(r"^[0-9]+(\s+[0-9]+)*$")
_SIGNED = re.compile(r"^-?[0-9]+(\s+-?[0-9]+)*$")


@dataclass(frozen=True)
class PsbShape:
    """One mesh of the folder: ``<root>/<cls>/<number>.off`` and its labels file."""

    id: str
    cls: str
    number: int
    mesh: Path
    labels: Path


@dataclass(frozen=True)
class Coverage:
    """How the parts of a labels file cover the faces of its mesh."""

    faces: int
    unlabelled: np.ndarray    # 0-based faces in no part
    overlapping: np.ndarray   # 0-based faces in two or more parts


# ----------------------------------------------------------------------------- discovery


def psb_root(root: str | Path) -> Path:
    """``root`` itself when it holds ``<Class>/<n>.off`` folders, else its ``LabeledDB_new`` (also
    under ``labeledDb/``, as in the repository that ships it)."""
    root = Path(root)
    for cand in (root, root / FOLDER, root / "labeledDb" / FOLDER):
        if cand.is_dir() and any(cand.glob("*/*.off")):
            return cand
    raise FileNotFoundError(f"no <Class>/<n>.off meshes under {root} (expected the {FOLDER} folder of "
                            f"the Labeled PSB benchmark)")


def find_shapes(root: str | Path) -> list[PsbShape]:
    """Every ``<Class>/<n>.off`` under the root, by class name then mesh number. A mesh whose labels
    file is absent is still listed (its part row becomes a ``missing_file`` failure), so that both
    stores have the same rows; a mesh whose stem is not a number is a ValueError."""
    base = psb_root(root)
    shapes = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        for mesh in folder.glob("*.off"):
            if not mesh.stem.isdigit():
                raise ValueError(f"{folder.name}/{mesh.name}: expected meshes named <number>.off")
            shapes.append(PsbShape(f"{folder.name}-{int(mesh.stem)}", folder.name, int(mesh.stem), mesh,
                                   mesh.with_name(mesh.stem + LABELS_SUFFIX)))
    return sorted(shapes, key=lambda s: (s.cls, s.number))


def split_of(shapes: Sequence[PsbShape], test_fraction: float = 0.2, seed: int = 0) -> dict[str, str]:
    """Shape id → ``train`` | ``test``: seeded, stratified by class (``seeded_split``)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    ids = [s.id for s in shapes]
    return dict(zip(ids, seeded_split(ids, [s.cls for s in shapes], test_fraction, seed)))


def split_rule(test_fraction: float, seed: int) -> str:
    return f"seeded stratified split by class (test_fraction={test_fraction}, seed={seed})"


def _ordered(shapes: Sequence[PsbShape], split: dict[str, str]) -> list[PsbShape]:
    """Train shapes, then test shapes (a split is a contiguous block of rows)."""
    return sorted(shapes, key=lambda s: (SPLITS.index(split[s.id]), s.cls, s.number))


# ----------------------------------------------------------------------------- labels


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def read_labels(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """The parts of a labels file in file order: (name, 1-based face indices as written, int64).

    A name line is one token that is not all digits; every following line of integers adds to that
    part's faces. ValueError (naming the file and line) for indices before any name, a line that is
    neither, a negative index, or a file with no part; FileNotFoundError when it is absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{_name(path)}: labels file not found")
    parts: list[tuple[str, list[str]]] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if _INDICES.match(line):
            if not parts:
                raise ValueError(f"{_name(path)}: line {number}: face indices before any part name")
            parts[-1][1].append(line)
        elif _SIGNED.match(line):
            raise ValueError(f"{_name(path)}: line {number}: negative face index (indices are 1-based)")
        elif len(line.split()) == 1:
            parts.append((line, []))
        else:
            raise ValueError(f"{_name(path)}: line {number}: expected a part name (one token) or a line of "
                             f"face indices, got {line[:60]!r}")
    if not parts:
        raise ValueError(f"{_name(path)}: no parts")
    return [(name, np.asarray(" ".join(lines).split(), dtype=np.int64)) for name, lines in parts]


def coverage(parts: Sequence[tuple[str, np.ndarray]], n_faces: int, path: str | Path = "labels") -> Coverage:
    """Faces in no part and faces in more than one part (by name: a repeated name is one part).
    ValueError when an index is outside ``1 .. n_faces``."""
    owners = np.zeros(n_faces, dtype=np.int64)
    names: dict[str, np.ndarray] = {}
    for name, idx in parts:
        bad = idx[(idx < 1) | (idx > n_faces)]
        if bad.size:
            raise ValueError(f"{_name(Path(path))}: part {name!r} lists face {int(bad[0])}, outside 1..{n_faces} "
                             f"(the mesh has {n_faces} faces; indices are 1-based; {bad.size} such indices)")
        names[name] = np.union1d(names.get(name, np.zeros(0, np.int64)), idx - 1)
    for faces in names.values():
        owners[faces] += 1
    return Coverage(n_faces, np.flatnonzero(owners == 0), np.flatnonzero(owners > 1))


def face_parts(path: str | Path, n_faces: int) -> tuple[list[str], np.ndarray]:
    """(part names in file order, int64 [n_faces] index into them) of a labels file for a mesh of
    ``n_faces`` faces. ValueError (naming the file) unless every face is in exactly one part."""
    path = Path(path)
    parts = read_labels(path)
    cover = coverage(parts, n_faces, path)
    for what, faces in (("in no part", cover.unlabelled), ("in two or more parts", cover.overlapping)):
        if faces.size:
            raise ValueError(f"{_name(path)}: {faces.size} of {n_faces} faces are {what} "
                             f"(e.g. faces {(faces[:5] + 1).tolist()}, 1-based)")
    names = list(dict.fromkeys(name for name, _ in parts))
    part = np.empty(n_faces, dtype=np.int64)
    for name, idx in parts:
        part[idx - 1] = names.index(name)
    return names, part


def class_vocabularies(shapes: Sequence[PsbShape]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({class: sorted part names of its readable label files}, {shape id: why its file was not
    read}). Every class of ``shapes`` is a key, possibly with no parts."""
    vocab: dict[str, set[str]] = {s.cls: set() for s in shapes}
    unread: dict[str, str] = {}
    for s in shapes:
        try:
            vocab[s.cls].update(name for name, _ in read_labels(s.labels))
        except (OSError, ValueError) as err:
            unread[s.id] = str(err)
    return {c: sorted(names) for c, names in vocab.items()}, unread


def global_part_ids(vocab: dict[str, list[str]], class_names: Sequence[str]) -> list[list[int]]:
    """The global part ids of each class, offsets running over ``class_names`` in order."""
    out, start = [], 0
    for c in class_names:
        out.append(list(range(start, start + len(vocab[c]))))
        start += len(vocab[c])
    return out


# ----------------------------------------------------------------------------- meshes and points


def off_counts(path: str | Path) -> tuple[int, int]:
    """(vertices, faces) of an OFF header (``OFF`` alone or followed by the counts; ``#`` comments)."""
    path = Path(path)
    tokens: list[str] = []
    with open(path) as f:
        for line in f:
            tokens += line.split("#", 1)[0].split()
            if len(tokens) >= 4:
                break
    if not tokens or not tokens[0].endswith("OFF"):
        raise ValueError(f"{_name(path)}: not an OFF file (first token {tokens[:1]})")
    try:
        return int(tokens[1]), int(tokens[2])
    except (IndexError, ValueError):
        raise ValueError(f"{_name(path)}: no '<vertices> <faces> <edges>' counts after OFF") from None


def load_off(path: str | Path):
    """The mesh as written (trimesh, ``process=False``, validated), with exactly the header's faces
    in file order; ValueError when the triangle count differs from the header."""
    _, n_faces = off_counts(path)
    mesh = load_mesh(path)
    if len(mesh.faces) != n_faces:
        raise ValueError(f"{_name(Path(path))}: the OFF header declares {n_faces} faces but {len(mesh.faces)} "
                         f"triangles were read (non-triangle or missing faces): face labels would not match")
    return mesh


def _sample_mesh(mesh, shape_id: str, n_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """([n, 6] ``x y z nx ny nz``: unit-sphere samples and their face normals, [n] 0-based faces)."""
    points, face = sample_surface_faces(mesh, n_points, shape_seed(seed, shape_id))
    normals = np.asarray(mesh.face_normals, dtype=np.float32)[face]
    return np.concatenate([points, normals], axis=1), face


def sample_points(shape: PsbShape, n_points: int, seed: int = 0) -> np.ndarray:
    """[n_points, 6] ``x y z nx ny nz`` (the classification store's row; labels are not read)."""
    return _sample_mesh(load_off(shape.mesh), shape.id, n_points, seed)[0]


def sample_parts(shape: PsbShape, part_ids: dict[str, int], n_points: int, seed: int = 0) -> np.ndarray:
    """[n_points, 7] ``x y z nx ny nz part``: the samples of :func:`sample_points` with the global
    part id (``part_ids[name]``) of the face each lies on."""
    mesh = load_off(shape.mesh)
    names, part = face_parts(shape.labels, len(mesh.faces))
    unknown = [n for n in names if n not in part_ids]
    if unknown:
        raise ValueError(f"{_name(shape.labels)}: parts {unknown} are not in the {shape.cls} vocabulary")
    cloud, face = _sample_mesh(mesh, shape.id, n_points, seed)
    lookup = np.asarray([part_ids[n] for n in names], dtype=np.float32)
    return np.concatenate([cloud, lookup[part[face], None]], axis=1)


# ----------------------------------------------------------------------------- stores


def _common(shapes: list[PsbShape], seed: int, test_fraction: float, fmt: str, root: Path):
    class_names = sorted({s.cls for s in shapes})
    split = split_of(shapes, test_fraction, seed)
    params = {"format": fmt, "seed": seed, "test_fraction": test_fraction,
              "split_rule": split_rule(test_fraction, seed), "normalisation": NORMALISATION,
              "sampler": "area-weighted surface samples (pipeline.sampling.sample_surface_faces), "
                         "seeded with shape_seed(seed, id)"}
    provenance = {"source": str(root.resolve()), "classes": {c: sum(s.cls == c for s in shapes) for c in class_names},
                  "split_counts": {k: sum(v == k for v in split.values()) for k in SPLITS}}
    return class_names, split, _ordered(shapes, split), params, provenance


def convert_labeled_psb(root: str | Path, out: str | Path, n_points: int = 2048, seed: int = 0,
                        test_fraction: float = 0.2, normals: bool = False, chunk_rows: int = 16,
                        log=print) -> ConvertResult:
    """``LabeledDB_new`` → a classification store (``pipeline.convert``), class = folder name."""
    base = psb_root(root)
    shapes = find_shapes(base)
    names, split, rows, params, provenance = _common(shapes, seed, test_fraction, "labeled-psb", base)
    label = {c: i for i, c in enumerate(names)}
    samples = [Sample(s.id, split[s.id], label[s.cls], lambda s=s: sample_points(s, n_points, seed)) for s in rows]
    return write_classification_store(out, samples, names, n_points, params, provenance, normals,
                                      chunk_rows, log=log)


def convert_labeled_psb_parts(root: str | Path, out: str | Path, n_points: int = 2048, seed: int = 0,
                              test_fraction: float = 0.2, chunk_rows: int = 16, log=print) -> ConvertResult:
    """``LabeledDB_new`` → a part-segmentation store (``pipeline.partseg_store``): per-class sorted
    part vocabularies, global ids offset class by class, the split of :func:`convert_labeled_psb`."""
    base = psb_root(root)
    shapes = find_shapes(base)
    names, split, rows, params, provenance = _common(shapes, seed, test_fraction,
                                                     "labeled-psb-parts", base)
    vocab, unread = class_vocabularies(shapes)
    parts = global_part_ids(vocab, names)
    part_ids = {c: dict(zip(vocab[c], ids)) for c, ids in zip(names, parts)}
    label = {c: i for i, c in enumerate(names)}
    samples = [PartSample(s.id, split[s.id], label[s.cls],
                          lambda s=s: sample_parts(s, part_ids[s.cls], n_points, seed)) for s in rows]
    params = {**params, "part_names": {c: vocab[c] for c in names}, "part_order": "sorted by name within a class"}
    provenance = {**provenance, "unreadable_label_files": unread}
    return write_partseg_store(out, samples, names, parts, n_points, params, provenance, SPLITS, seed,
                               "subset", chunk_rows, log)
