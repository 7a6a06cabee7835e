"""Part-segmentation stores, and the converter of the ShapeNetPart benchmark into one.

Store layout (one store, every split in it; written through ``pipeline.store``):

- ``ids``     str [N]            ``<synset>-<model id>``
- ``points``  float32 [N, P, 3]  centred on the centroid of *all* source points and scaled to max
                                 norm 1 (the reference's ``pc_normalize``), then P of them chosen
                                 (see :func:`choose_points`)
- ``normals`` float32 [N, P, 3]  the chosen points' normals (unchanged by the normalisation)
- ``part``    uint8 [N, P]       global part id of every point, 0 .. ``num_parts`` - 1
- ``label``   int64 [N]          category index into ``params.class_names``
- ``split``   uint8 [N]          index into ``params.splits``

``params`` carries what a reader needs to score a prediction: ``class_names``,
``category_parts`` (the global part ids of each category, aligned with ``class_names``),
``num_parts``, ``splits``, plus the point count and the sampling rule. Rows that cannot be read
(a listed file that is missing, a malformed line, a part id outside its category) stay in the
store with ``ok = False`` and zeros, and a failure record; they never stop the conversion.

ShapeNetPart (``shapenetcore_partanno_segmentation_benchmark_v0_normal``): ``synsetoffset2category.txt``
(``<Name> <synset>`` per line; its order gives the category index, as in the reference),
``<synset>/<model id>.txt`` with one ``x y z nx ny nz part`` line per point, and the official
``train_test_split/shuffled_{train,val,test}_file_list.json`` listing ``shape_data/<synset>/<model id>``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.convert import ConvertResult
from pipeline.sampling import normalize_unit_sphere, shape_seed
from pipeline.store import ArraySpec, StoreWriter, open_store, read_failure_log

#: The 16 ShapeNetPart categories in the order of the official ``synsetoffset2category.txt``, with
#: their synset and the global ids of their parts (50 in all). The one copy of this table.
SHAPENETPART_CATEGORIES: dict[str, tuple[str, tuple[int, ...]]] = {
    "Airplane": ("02691156", (0, 1, 2, 3)),
    "Bag": ("02773838", (4, 5)),
    "Cap": ("02954340", (6, 7)),
    "Car": ("02958343", (8, 9, 10, 11)),
    "Chair": ("03001627", (12, 13, 14, 15)),
    "Earphone": ("03261776", (16, 17, 18)),
    "Guitar": ("03467517", (19, 20, 21)),
    "Knife": ("03624134", (22, 23)),
    "Lamp": ("03636649", (24, 25, 26, 27)),
    "Laptop": ("03642806", (28, 29)),
    "Motorbike": ("03790512", (30, 31, 32, 33, 34, 35)),
    "Mug": ("03797390", (36, 37)),
    "Pistol": ("03948459", (38, 39, 40)),
    "Rocket": ("04099429", (41, 42, 43)),
    "Skateboard": ("04225987", (44, 45, 46)),
    "Table": ("04379243", (47, 48, 49)),
}
SHAPENETPART_NUM_PARTS = 50
SHAPENETPART_SPLITS = ["train", "val", "test"]
SHAPENETPART_DIR = "shapenetcore_partanno_segmentation_benchmark_v0_normal"
SAMPLING_RULES = ("subset", "with_replacement")
FORMATS = ("shapenetpart", "demo-parts")    # the `recon convert` formats that write these stores


@dataclass
class PartSample:
    """One shape; ``load`` returns its [n, 7] array ``x y z nx ny nz part``."""

    id: str
    split: str
    label: int
    load: Callable[[], np.ndarray]


# ----------------------------------------------------------------------------- sampling


def choose_points(n: int, n_points: int, seed: int, shape_id: str, rule: str = "subset") -> np.ndarray:
    """Indices of the ``n_points`` points kept out of ``n``, a pure function of (seed, shape id).

    ``subset`` (default): a seeded random permutation, cut to ``n_points``; a shape with fewer
    points keeps all of them and repeats seeded random picks to fill up. ``with_replacement``:
    ``n_points`` seeded draws with replacement, the distribution of the reference's
    ``np.random.choice(n, npoints, replace=True)`` (which it redraws at every access; a store
    fixes one draw). The order is random either way, so FPS (which starts at index 0) starts at
    a random point, as in the reference.
    """
    if rule not in SAMPLING_RULES:
        raise ValueError(f"unknown sampling rule {rule!r}; choose from {SAMPLING_RULES}")
    rng = np.random.Generator(np.random.PCG64(shape_seed(seed, shape_id)))
    if rule == "with_replacement":
        return rng.choice(n, n_points, replace=True)
    order = rng.permutation(n)
    if n >= n_points:
        return order[:n_points]
    return np.concatenate([order, rng.choice(n, n_points - n, replace=True)])


# ----------------------------------------------------------------------------- writing


def _check_cloud(cloud: np.ndarray, parts: Sequence[int]) -> np.ndarray:
    """The [n] part ids of a loaded [n, 7] cloud; ValueError when it is unusable."""
    if cloud.ndim != 2 or cloud.shape[1] != 7:
        raise ValueError(f"expected [n, 7] rows 'x y z nx ny nz part', got shape {cloud.shape}")
    if cloud.shape[0] == 0:
        raise ValueError("no points")
    if not np.isfinite(cloud).all():
        raise ValueError("non-finite values")
    part = cloud[:, 6]
    if not np.array_equal(part, np.round(part)):
        raise ValueError("part ids are not integers")
    part = part.astype(np.int64)
    outside = np.setdiff1d(np.unique(part), np.asarray(parts))
    if outside.size:
        raise ValueError(f"part ids {outside.tolist()} are not parts of this category {list(parts)}")
    return part


def write_partseg_store(out: str | Path, samples: Sequence[PartSample], class_names: list[str],
                        category_parts: list[list[int]], n_points: int, params: dict,
                        provenance: dict | None = None, splits: list[str] | None = None,
                        seed: int = 0, sampling: str = "subset", chunk_rows: int = 16,
                        log=print) -> ConvertResult:
    """Write ``samples`` into a part-segmentation store (module docstring); resumable."""
    out = Path(out)
    splits = splits or SHAPENETPART_SPLITS
    split_index = {s: i for i, s in enumerate(splits)}
    num_parts = 1 + max(p for parts in category_parts for p in parts)
    if num_parts > 256:
        raise ValueError(f"{num_parts} parts do not fit the uint8 part array")
    if sampling not in SAMPLING_RULES:
        raise ValueError(f"unknown sampling rule {sampling!r}; choose from {SAMPLING_RULES}")
    arrays = {"points": ArraySpec((n_points, 3), "float32", chunk_rows),
              "normals": ArraySpec((n_points, 3), "float32", chunk_rows),
              "part": ArraySpec((n_points,), "uint8", chunk_rows),
              "label": ArraySpec((), "int64", chunk_rows),
              "split": ArraySpec((), "uint8", chunk_rows)}
    params = {**params, "task": "partseg", "points": n_points, "sampling": sampling, "seed": seed,
              "normalisation": "unit sphere over all source points (centroid, max norm 1), then sampling",
              "class_names": list(class_names), "category_parts": [list(p) for p in category_parts],
              "num_parts": num_parts, "splits": list(splits), "chunk_rows": chunk_rows}
    provenance = {**(provenance or {}), "rows": len(samples)}
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = StoreWriter.open(out, [s.id for s in samples], arrays, params, provenance, log=log)
    if writer is None:
        log(f"convert: {out} is up to date")
        return ConvertResult(out, len(samples), int((~open_store(out).ok).sum()),
                             list(read_failure_log(out).values()))
    stage = f"convert:{params.get('format', '?')}"
    for block in writer.pending_blocks():
        data = {name: np.zeros((block.size, *spec.row_shape), dtype=spec.dtype) for name, spec in arrays.items()}
        ok = np.zeros(block.size, dtype=bool)
        for slot, row in enumerate(block):
            s = samples[row]
            data["label"][slot], data["split"][slot] = s.label, split_index[s.split]
            try:
                cloud = np.asarray(s.load(), dtype=np.float32)
                part = _check_cloud(cloud, category_parts[s.label])
            except Exception as err:  # noqa: BLE001 - one unreadable shape is recorded, not fatal
                kind = "missing_file" if isinstance(err, FileNotFoundError) else type(err).__name__
                warnings.warn(f"{s.id}: {err}", stacklevel=2)
                log(f"[yellow]convert: skipped {s.id}[/]: {err}")
                writer.record_failure(s.id, stage, kind, str(err))
                continue
            xyz = normalize_unit_sphere(cloud[:, :3])[0]
            pick = choose_points(len(cloud), n_points, seed, s.id, sampling)
            data["points"][slot], data["normals"][slot] = xyz[pick], cloud[pick, 3:6]
            data["part"][slot], ok[slot] = part[pick], True
        writer.write_rows(block, data, ok)
    failures = writer.failures()
    writer.finalise({"failed": len(failures)})
    return ConvertResult(out, len(samples), len(failures), failures)


# ----------------------------------------------------------------------------- ShapeNetPart


def shapenetpart_root(root: Path) -> Path:
    for cand in (root, root / SHAPENETPART_DIR):
        if (cand / "synsetoffset2category.txt").exists():
            return cand
    raise FileNotFoundError(f"no synsetoffset2category.txt under {root} (expected the {SHAPENETPART_DIR} layout)")


def read_categories(path: Path) -> list[tuple[str, str]]:
    """(name, synset) per line of ``synsetoffset2category.txt``, in file order; every name must be
    one of the 16 ShapeNetPart categories (their part ids are fixed)."""
    found = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}: expected '<Name> <synset>' lines, got {line!r}")
        name, synset = fields
        if name not in SHAPENETPART_CATEGORIES:
            raise ValueError(f"{path}: unknown category {name!r}; ShapeNetPart has {list(SHAPENETPART_CATEGORIES)}")
        found.append((name, synset))
    return found


def read_part_file(path: Path) -> np.ndarray:
    """One ``x y z nx ny nz part`` text file → float32 [n, 7]; ValueError when malformed."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    values = " ".join(lines).split()
    if len(values) != 7 * len(lines):
        raise ValueError(f"expected 7 numbers per line in {Path(path).name}, found {len(values)} in {len(lines)} lines")
    return np.asarray(values, dtype=np.float32).reshape(len(lines), 7)


def shapenetpart_samples(root: Path) -> tuple[list[PartSample], list[str], list[list[int]], dict]:
    """Samples of every shape the official split lists name (train, val, test, each sorted by id),
    the class names, their part ids, and what was skipped at list level (``info``)."""
    categories = read_categories(root / "synsetoffset2category.txt")
    label_of = {synset: i for i, (_, synset) in enumerate(categories)}
    seen: dict[str, str] = {}
    info: dict[str, list[str]] = {"unknown_synset": [], "malformed_entry": [], "duplicate": []}
    samples: list[PartSample] = []
    for split in SHAPENETPART_SPLITS:
        listing = root / "train_test_split" / f"shuffled_{split}_file_list.json"
        if not listing.exists():
            raise FileNotFoundError(f"split list {listing} not found")
        entries = json.loads(listing.read_text())
        rows = []
        for entry in entries:
            fields = str(entry).strip("/").split("/")
            if len(fields) < 2 or not fields[-1]:
                info["malformed_entry"].append(str(entry))
                continue
            synset, token = fields[-2], fields[-1]
            if synset not in label_of:
                info["unknown_synset"].append(str(entry))
                continue
            sid = f"{synset}-{token}"
            if sid in seen:
                info["duplicate"].append(f"{sid} ({seen[sid]} and {split})")
                continue
            seen[sid] = split
            rows.append((sid, synset, token))
        for sid, synset, token in sorted(rows):
            path = root / synset / f"{token}.txt"
            samples.append(PartSample(sid, split, label_of[synset], lambda p=path: read_part_file(p)))
    for kind, items in info.items():
        if items:
            warnings.warn(f"{len(items)} split-list entries skipped ({kind}), e.g. {items[:3]}", stacklevel=2)
    names = [name for name, _ in categories]
    return samples, names, [list(SHAPENETPART_CATEGORIES[n][1]) for n in names], info


def convert_shapenetpart(root: str | Path, out: str | Path, n_points: int = 2048, seed: int = 0,
                         sampling: str = "subset", chunk_rows: int = 16, log=print) -> ConvertResult:
    """``shapenetcore_partanno_segmentation_benchmark_v0_normal`` → a part-segmentation store."""
    base = shapenetpart_root(Path(root))
    samples, names, parts, info = shapenetpart_samples(base)
    return write_partseg_store(out, samples, names, parts, n_points, {"format": "shapenetpart"},
                               {"source": str(root), "skipped_list_entries": info},
                               SHAPENETPART_SPLITS, seed, sampling, chunk_rows, log)
