"""Find the shapes of a mesh folder and assign splits.

Layouts understood:
- ShapeNetCore v2: ``<root>/<synset>/<model_id>/models/model_normalized.obj`` (+ ``taxonomy.json``)
- ShapeNetCore v1: ``<root>/<synset>/<model_id>/model.obj`` (+ ``taxonomy.json``)
- plain folders: ``<root>/<category>/<name>.{obj,off,ply,stl,glb,gltf}``

Shape ids are ``<synset>-<model_id>`` (the Point-BERT ShapeNet-55 list format without ``.npy``)
or ``<category>-<file stem>`` for plain folders. Two files of one category folder that would get the
same id (``x.obj`` and ``x.ply``; ``a/b.obj`` and ``a-b.obj``) are told apart by their suffix
(``mug-x-obj``, ``mug-x-ply``); where even that clashes, indexing refuses and names the files.

``mesh_path`` is relative to the indexed root; the root itself is recorded once, in the table's
metadata (see :func:`resolve_mesh_paths`), so a cache does not depend on where the clone lives.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

MESH_SUFFIXES = (".obj", ".off", ".ply", ".stl", ".glb", ".gltf")
SHAPENET_MODEL_FILES = ("models/model_normalized.obj", "model.obj")
SHAPES_SCHEMA = {"id": pl.Utf8, "synset": pl.Utf8, "category": pl.Utf8, "split": pl.Utf8,
                 "mesh_path": pl.Utf8, "status": pl.Utf8}


@dataclass(frozen=True)
class Skipped:
    """A file or folder that looked like a shape but cannot be one."""

    id: str
    path: str
    error: str
    message: str


def read_taxonomy(root: Path) -> dict[str, str]:
    """synset id → short category name (the first of ShapeNet's comma-separated names)."""
    path = root / "taxonomy.json"
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())
    return {e["synsetId"]: e["name"].split(",")[0].strip() for e in entries}


def _is_synset(name: str) -> bool:
    return len(name) == 8 and name.isdigit()


def find_shapes(root: Path) -> tuple[list[dict], list[Skipped]]:
    """Walk ``root`` and return (shape rows without split, skipped entries)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"mesh folder {root} does not exist")
    taxonomy = read_taxonomy(root)
    rows: list[dict] = []
    skipped: list[Skipped] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_synset(folder.name):
            category = taxonomy.get(folder.name, folder.name)
            for model in sorted(p for p in folder.iterdir() if p.is_dir()):
                shape_id = f"{folder.name}-{model.name}"
                mesh = next((model / f for f in SHAPENET_MODEL_FILES if (model / f).exists()), None)
                if mesh is None:
                    skipped.append(Skipped(shape_id, str(model), "missing_model",
                                           f"no {' or '.join(SHAPENET_MODEL_FILES)} in {model}"))
                    continue
                rows.append(dict(id=shape_id, synset=folder.name, category=category,
                                 mesh_path=mesh.relative_to(root).as_posix()))
        else:
            plain: list[dict] = []
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                shape_id = f"{folder.name}-{file.relative_to(folder).with_suffix('').as_posix().replace('/', '-')}"
                if file.suffix.lower() in MESH_SUFFIXES:
                    plain.append(dict(id=shape_id, synset="", category=folder.name,
                                      mesh_path=file.relative_to(root).as_posix()))
                elif file.suffix.lower() not in (".mtl", ".png", ".jpg", ".jpeg", ".bin", ".json", ".txt"):
                    skipped.append(Skipped(shape_id, str(file), "unsupported",
                                           f"not a mesh file ({file.suffix or 'no suffix'}): {file}"))
            rows.extend(disambiguate(plain, root))
    return rows, skipped


class DuplicateShapeIds(ValueError):
    """Two mesh files would get the same shape id even with their suffixes."""


def disambiguate(rows: list[dict], root: Path) -> list[dict]:
    """Unique ids for one plain category folder: rows whose id is shared by several files get
    their file suffix appended (``mug-x`` from ``x.obj`` and ``x.ply`` → ``mug-x-obj``,
    ``mug-x-ply``); the others keep theirs. Deterministic (it depends only on the file names)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["id"]] = counts.get(row["id"], 0) + 1
    for row in rows:
        if counts[row["id"]] > 1:
            row["id"] = f"{row['id']}-{Path(row['mesh_path']).suffix.lstrip('.').lower()}"
    seen: dict[str, list[str]] = {}
    for row in rows:
        seen.setdefault(row["id"], []).append(row["mesh_path"])
    clashes = {i: paths for i, paths in seen.items() if len(paths) > 1}
    if clashes:
        listing = "; ".join(f"{i}: {', '.join(str(root / p) for p in paths)}" for i, paths in sorted(clashes.items()))
        raise DuplicateShapeIds(f"these mesh files would share a shape id: {listing}. Rename one of each "
                                "group (ids are <category>-<path below the category, '/' as '-'>[-<suffix>])")
    return rows


def read_split_lists(folder: Path) -> dict[str, str] | None:
    """Point-BERT style ``train.txt``/``test.txt`` (lines like ``02691156-<id>.npy``) → id → split."""
    lists = {s: Path(folder) / f"{s}.txt" for s in ("train", "test")}
    if not any(p.exists() for p in lists.values()):
        return None
    splits: dict[str, str] = {}
    for split, path in lists.items():
        if path.exists():
            for line in path.read_text().split():
                splits[line.strip().removesuffix(".npy")] = split
    return splits


def seeded_split(ids: list[str], categories: list[str], test_fraction: float, seed: int) -> list[str]:
    """A split stratified by category, reproducible for a seed, independent of row order."""
    split = {}
    by_category: dict[str, list[str]] = {}
    for shape_id, category in zip(ids, categories):
        by_category.setdefault(category, []).append(shape_id)
    for category, members in sorted(by_category.items()):
        members = sorted(members)
        rng = np.random.default_rng([seed, *category.encode()])
        order = rng.permutation(len(members))
        n_test = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        for rank, i in enumerate(order):
            split[members[i]] = "test" if rank < n_test else "train"
    return [split[i] for i in ids]


def build_table(root: Path, split_dir: Path | None = None, test_fraction: float = 0.2,
                seed: int = 0, limit: int | None = None) -> tuple[pl.DataFrame, list[Skipped], str]:
    """The shapes table (one row per shape, sorted by id), what was skipped, and the split rule."""
    rows, skipped = find_shapes(root)
    rows.sort(key=lambda r: r["id"])
    shared = sorted({a["id"] for a, b in zip(rows, rows[1:]) if a["id"] == b["id"]})
    if shared:  # e.g. plain folders "a" with "b-c.obj" and "a-b" with "c.obj"
        listing = "; ".join(f"{i}: {', '.join(str(Path(root) / r['mesh_path']) for r in rows if r['id'] == i)}"
                            for i in shared)
        raise DuplicateShapeIds(f"these mesh files would share a shape id: {listing}. Rename one of each group")
    if limit is not None:
        rows = rows[:limit]
    ids = [r["id"] for r in rows]
    lists = read_split_lists(split_dir) if split_dir else read_split_lists(root)
    if lists is not None:
        splits = [lists.get(i, "unlisted") for i in ids]
        rule = "train.txt/test.txt lists"
    else:
        splits = seeded_split(ids, [r["category"] for r in rows], test_fraction, seed)
        rule = f"seeded stratified split (test_fraction={test_fraction}, seed={seed})"
    for row, split in zip(rows, splits):
        row["split"] = split
        row["status"] = "indexed"
    table = pl.DataFrame(rows, schema=SHAPES_SCHEMA) if rows else pl.DataFrame(schema=SHAPES_SCHEMA)
    return table.select(list(SHAPES_SCHEMA)), skipped, rule


def recorded_root(root: Path, table_dir: Path) -> str:
    """The dataset root as the shapes table records it: relative to the table's folder when the
    root was given as a relative path (a clone or cache moved elsewhere still finds its meshes,
    and the table's bytes do not depend on where it lives), absolute when given absolute."""
    root = Path(root)
    if root.is_absolute():
        return root.as_posix()
    return Path(os.path.relpath(root.resolve(), Path(table_dir).resolve())).as_posix()


def table_metadata(shapes_path: Path) -> dict:
    """The ``recon`` key-value metadata of a shapes table ({} when absent)."""
    import polars as pl

    raw = pl.read_parquet_metadata(shapes_path).get("recon")
    return json.loads(raw) if raw else {}


def resolve_mesh_paths(table: pl.DataFrame, shapes_path: Path) -> pl.DataFrame:
    """The table with ``mesh_path`` made absolute: joined to the recorded root, itself relative to
    the table's folder unless absolute. (Tables indexed before paths were relative hold absolute
    paths, which the join leaves as they are.)"""
    shapes_path = Path(shapes_path)
    root = shapes_path.parent / table_metadata(shapes_path).get("root", ".")
    paths = [str((root / p).absolute()) if p else p for p in table["mesh_path"].to_list()]
    return table.with_columns(pl.Series("mesh_path", paths, dtype=pl.Utf8))
