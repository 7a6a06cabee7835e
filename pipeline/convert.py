"""Converters from public downstream datasets to one classification store (``pipeline.store``).

Store layout (one store per dataset, every split in it; one store per fold for few-shot pickles):

- ``ids``     str [N]            shape ids (ModelNet file stems, shapes.parquet ids, or
                                 ``<split>-<index>`` where the source has none)
- ``points``  float32 [N, P, 3]  as in the source (not re-normalised), FPS'd to P when asked
- ``normals`` float32 [N, P, 3]  optional (``normals=True`` and the source has them)
- ``label``   int64 [N]          index into ``params.class_names``
- ``split``   uint8 [N]          index into ``params.splits`` (e.g. ``["train", "test"]``)
- ``source_label`` int64 [N]     few-shot pickles only: the original ModelNet40 label of the row

The split is a per-row array rather than one store per split so that a dataset is one artefact
with one provenance, and few-shot episodes or validation splits can be drawn from any store.
Attributes: ``params`` (format, points, normals, class_names, splits, variant: what determines the
content), ``provenance`` (source path, counts). Rows that cannot be read (a listed file that is
missing, too few points) stay in the store with ``ok = False``, zeros, and a failure record;
they are reported as warnings and never stop the conversion.

Formats: ``modelnet40`` / ``modelnet10`` (``modelnet40_normal_resampled`` text layout),
``pointbert-dat`` and ``fewshot-pkl`` (Python pickles: loaded only with ``trust_pickle=True``),
``scanobjectnn`` (official h5 release, variants OBJ_BG, OBJ_ONLY, PB_T50_RS) and ``points``
(this project's ``points.zarr`` + ``shapes.parquet``).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline.store import ArraySpec, StoreWriter, open_store, read_failure_log, relative_to_store

FORMATS = ("modelnet40", "modelnet10", "pointbert-dat", "fewshot-pkl", "scanobjectnn", "points")
SPLITS = ["train", "test"]

SCANOBJECTNN_CLASSES = ["bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf",
                        "table", "bed", "pillow", "sink", "sofa", "toilet"]
# variant -> (folder, training file, test file), as in the official release
SCANOBJECTNN_FILES = {
    "PB_T50_RS": ("main_split", "training_objectdataset_augmentedrot_scale75.h5",
                  "test_objectdataset_augmentedrot_scale75.h5"),
    "OBJ_BG": ("main_split", "training_objectdataset.h5", "test_objectdataset.h5"),
    "OBJ_ONLY": ("main_split_nobg", "training_objectdataset.h5", "test_objectdataset.h5"),
}


class PickleRefused(ValueError):
    """A pickle was about to be loaded without ``trust_pickle=True``."""


@dataclass
class Sample:
    """One shape of a source dataset; ``load`` returns its [n, 3] or [n, 6] (xyz + normals) array."""

    id: str
    split: str
    label: int
    load: Callable[[], np.ndarray]
    source_label: int | None = None


@dataclass
class ConvertResult:
    path: Path
    rows: int
    failed: int
    failures: list[dict]


# ----------------------------------------------------------------------------- pickles


def load_pickle(path: str | Path, trust_pickle: bool = False):
    """Unpickle ``path`` only when the caller vouches for it: unpickling runs arbitrary code."""
    path = Path(path)
    if not trust_pickle:
        raise PickleRefused(
            f"{path} is a Python pickle, and loading a pickle can run arbitrary code. Only load "
            f"files you trust (e.g. downloaded yourself from the Point-BERT release); to convert it, "
            f"pass trust_pickle=True (CLI: --trust-pickle).")
    with open(path, "rb") as f:
        return pickle.load(f)


# ----------------------------------------------------------------------------- writing


#: farthest-point sampling of a batch of clouds [N, P, >=3] -> indices [N, n]. Given by the caller
#: (the stages pass ``recon.network.pointops.fps_indices``, the one FPS stores and fine-tuning
#: share): the data layer does not import the learning side.
FarthestPoints = Callable[[np.ndarray, int], np.ndarray]


def _resample(clouds: list[np.ndarray], n_points: int, fps: FarthestPoints | None) -> list[np.ndarray]:
    """FPS every cloud with more than ``n_points`` points down to ``n_points`` (batched by size)."""
    out = list(clouds)
    by_size: dict[int, list[int]] = {}
    for i, c in enumerate(clouds):
        if c.shape[0] > n_points:
            by_size.setdefault(c.shape[0], []).append(i)
    for idx in by_size.values():
        batch = np.stack([clouds[i] for i in idx])
        if fps is None:
            raise ValueError(f"clouds of {batch.shape[1]} points need farthest-point sampling to {n_points}: "
                             "pass fps= (recon.network.pointops.fps_indices)")
        picks = fps(batch, n_points)
        for i, pick in zip(idx, picks):
            out[i] = clouds[i][pick]
    return out


def write_classification_store(out: str | Path, samples: Sequence[Sample], class_names: list[str],
                               n_points: int, params: dict, provenance: dict | None = None,
                               normals: bool = False, chunk_rows: int = 16,
                               splits: list[str] | None = None, fps: FarthestPoints | None = None,
                               log=print) -> ConvertResult:
    """Write ``samples`` into a classification store (see module docstring); resumable."""
    out = Path(out)
    splits = splits or SPLITS
    split_index = {s: i for i, s in enumerate(splits)}
    arrays = {"points": ArraySpec((n_points, 3), "float32", chunk_rows),
              "label": ArraySpec((), "int64", chunk_rows),
              "split": ArraySpec((), "uint8", chunk_rows)}
    if normals:
        arrays["normals"] = ArraySpec((n_points, 3), "float32", chunk_rows)
    with_source = any(s.source_label is not None for s in samples)
    if with_source:
        arrays["source_label"] = ArraySpec((), "int64", chunk_rows)
    params = {**params, "points": n_points, "normals": normals, "class_names": list(class_names),
              "splits": list(splits), "chunk_rows": chunk_rows}
    provenance = {**(provenance or {}), "rows": len(samples)}
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = StoreWriter.open(out, [s.id for s in samples], arrays, params, provenance, log=log)
    if writer is None:
        log(f"convert: {out} is up to date")
        failures = list(read_failure_log(out).values())
        return ConvertResult(out, len(samples), int((~open_store(out).ok).sum()), failures)
    stage = f"convert:{params.get('format', '?')}"
    for block in writer.pending_blocks():
        data = {name: np.zeros((block.size, *spec.row_shape), dtype=spec.dtype) for name, spec in arrays.items()}
        ok = np.zeros(block.size, dtype=bool)
        loaded: dict[int, np.ndarray] = {}
        for slot, row in enumerate(block):
            s = samples[row]
            data["label"][slot] = s.label
            data["split"][slot] = split_index[s.split]
            if with_source:
                data["source_label"][slot] = -1 if s.source_label is None else s.source_label
            try:
                cloud = np.asarray(s.load(), dtype=np.float32)
                if cloud.ndim != 2 or cloud.shape[1] < 3:
                    raise ValueError(f"expected [n, 3 or 6] points, got shape {cloud.shape}")
                if normals and cloud.shape[1] < 6:
                    raise ValueError("normals requested but the source has only xyz")
                if cloud.shape[0] < n_points:
                    raise ValueError(f"has {cloud.shape[0]} points, fewer than the {n_points} asked for")
                if not np.isfinite(cloud[:, :6]).all():
                    raise ValueError("non-finite coordinates")
                loaded[slot] = cloud
            except Exception as err:  # noqa: BLE001 - one unreadable shape is recorded, not fatal
                kind = "missing_file" if isinstance(err, FileNotFoundError) else type(err).__name__
                message = str(err)
                warnings.warn(f"{s.id}: {message}", stacklevel=2)
                log(f"[yellow]convert: skipped {s.id}[/]: {message}")
                writer.record_failure(s.id, stage, kind, message)
        slots = sorted(loaded)
        for slot, cloud in zip(slots, _resample([loaded[k] for k in slots], n_points, fps)):
            data["points"][slot] = cloud[:, :3]
            if normals:
                data["normals"][slot] = cloud[:, 3:6]
            ok[slot] = True
        writer.write_rows(block, data, ok)
    failures = writer.failures()
    writer.finalise({"failed": len(failures)})
    return ConvertResult(out, len(samples), len(failures), failures)


# ----------------------------------------------------------------------------- ModelNet


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _modelnet_root(root: Path, prefix: str) -> Path:
    for cand in (root, root / "modelnet40_normal_resampled", root / prefix):
        if (cand / f"{prefix}_shape_names.txt").exists():
            return cand
    raise FileNotFoundError(f"no {prefix}_shape_names.txt under {root} (expected the "
                            f"modelnet40_normal_resampled layout)")


def modelnet_class(shape_id: str) -> str:
    """``night_stand_0001`` -> ``night_stand``."""
    return shape_id.rsplit("_", 1)[0]


def _load_txt(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)


def modelnet_samples(root: Path, dataset: str = "modelnet40") -> tuple[list[Sample], list[str], Path]:
    """Samples of the ``modelnet40_normal_resampled`` layout (``dataset`` = modelnet40 | modelnet10)."""
    base = _modelnet_root(Path(root), dataset)
    names = _read_list(base / f"{dataset}_shape_names.txt")
    lookup = {n: i for i, n in enumerate(names)}
    samples: list[Sample] = []
    missing = []
    for split in SPLITS:
        listing = base / f"{dataset}_{split}.txt"
        if not listing.exists():
            raise FileNotFoundError(f"split list {listing} not found")
        for shape_id in _read_list(listing):
            cls = modelnet_class(shape_id)
            if cls not in lookup:
                raise ValueError(f"{listing}: {shape_id!r} has class {cls!r}, not in {dataset}_shape_names.txt")
            path = base / cls / f"{shape_id}.txt"
            if not path.exists():
                missing.append(shape_id)
            samples.append(Sample(shape_id, split, lookup[cls], lambda p=path: _load_txt(p)))
    if missing:
        warnings.warn(f"{len(missing)} shapes listed in the split files are missing under {base} "
                      f"(e.g. {missing[:3]}); they are recorded as failures", stacklevel=2)
    return samples, names, base


def convert_modelnet(root: str | Path, out: str | Path, n_points: int = 8192, normals: bool = False,
                     dataset: str = "modelnet40", chunk_rows: int = 16, fps: FarthestPoints | None = None,
                     log=print) -> ConvertResult:
    samples, names, base = modelnet_samples(Path(root), dataset)
    return write_classification_store(out, samples, names, n_points, {"format": dataset}, {
        "source": str(base.resolve()), "sampling": f"farthest point sampling (start index 0) of the "
        f"{dataset} text files to {n_points} points"}, normals, chunk_rows, fps=fps, log=log)


# ----------------------------------------------------------------------------- Point-BERT pickles


def _label_int(label) -> int:
    return int(np.asarray(label).reshape(-1)[0])


def pointbert_dat_samples(root: Path, trust_pickle: bool = False) -> tuple[list[Sample], list[str]]:
    """Samples of ``modelnet40_{train,test}_<n>pts_fps.dat`` = pickled [points list, labels list]."""
    root = Path(root)
    files = {}
    for split in SPLITS:
        found = sorted(root.glob(f"modelnet40_{split}_*pts_fps.dat"))
        if not found:
            raise FileNotFoundError(f"no modelnet40_{split}_*pts_fps.dat under {root}")
        files[split] = found[-1]
    names_file = root / "modelnet40_shape_names.txt"
    samples: list[Sample] = []
    max_label = -1
    for split, path in files.items():
        points, labels = load_pickle(path, trust_pickle)
        if len(points) != len(labels):
            raise ValueError(f"{path}: {len(points)} clouds but {len(labels)} labels")
        listing = root / f"modelnet40_{split}.txt"
        ids = _read_list(listing) if listing.exists() else []
        if len(ids) != len(points):
            ids = [f"{split}-{i:05d}" for i in range(len(points))]
        for i, (cloud, label) in enumerate(zip(points, labels)):
            samples.append(Sample(ids[i], split, _label_int(label), lambda c=cloud: c))
            max_label = max(max_label, _label_int(label))
    names = _read_list(names_file) if names_file.exists() else [f"class{i}" for i in range(max_label + 1)]
    return samples, names


def convert_pointbert_dat(root: str | Path, out: str | Path, n_points: int | None = None,
                          normals: bool = False, trust_pickle: bool = False, chunk_rows: int = 16,
                          fps: FarthestPoints | None = None, log=print) -> ConvertResult:
    samples, names = pointbert_dat_samples(Path(root), trust_pickle)
    n_points = n_points or _native_points(samples)
    return write_classification_store(out, samples, names, n_points, {"format": "pointbert-dat"},
                                      {"source": str(Path(root).resolve())}, normals, chunk_rows,
                                      fps=fps, log=log)


FEWSHOT_DIR = re.compile(r"^(\d+)way_?(\d+)shot$")


def fewshot_files(root: Path) -> list[tuple[int, int, int, Path]]:
    """(way, shot, fold, path) of ``{way}way{shot}shot/{fold}.pkl`` (also ``{way}way_{shot}shot``)."""
    root = Path(root)
    if root.is_file():
        m = FEWSHOT_DIR.match(root.parent.name)
        way, shot = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        return [(way, shot, int(root.stem) if root.stem.isdigit() else 0, root)]
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        m = FEWSHOT_DIR.match(folder.name)
        if m:
            for f in sorted(folder.glob("*.pkl")):
                if f.stem.isdigit():
                    found.append((int(m.group(1)), int(m.group(2)), int(f.stem), f))
    if not found:
        raise FileNotFoundError(f"no {{way}}way{{shot}}shot/{{fold}}.pkl files under {root}")
    return sorted(found)


def fewshot_samples(path: Path, trust_pickle: bool = False,
                    source_names: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """One Point-BERT few-shot fold: ``{'train': [(points, label, source_label), ...], 'test': [...]}``
    where ``label`` is the episode class (0..way-1) and ``source_label`` the ModelNet40 class."""
    data = load_pickle(path, trust_pickle)
    if not isinstance(data, dict) or not all(s in data for s in SPLITS):
        raise ValueError(f"{path}: expected a dict with 'train' and 'test' lists")
    samples: list[Sample] = []
    episode_source: dict[int, int] = {}
    for split in SPLITS:
        for i, item in enumerate(data[split]):
            cloud, label = item[0], _label_int(item[1])
            source = _label_int(item[2]) if len(item) > 2 else None
            if source is not None:
                episode_source[label] = source
            samples.append(Sample(f"{split}-{i:05d}", split, label, lambda c=cloud: c, source))
    way = max(s.label for s in samples) + 1
    names = []
    for k in range(way):
        src = episode_source.get(k)
        if src is not None and source_names and src < len(source_names):
            names.append(source_names[src])
        else:
            names.append(f"class{src if src is not None else k}")
    return samples, names


def convert_fewshot(root: str | Path, out_dir: str | Path, n_points: int | None = None,
                    normals: bool = False, trust_pickle: bool = False,
                    shape_names: str | Path | None = None, chunk_rows: int = 16, fps: FarthestPoints | None = None,
                    log=print) -> list[ConvertResult]:
    """Every fold under ``root`` -> ``out_dir/{way}way{shot}shot/{fold}.zarr``."""
    if not trust_pickle:  # refuse before touching any file
        load_pickle(root, trust_pickle)
    names = _read_list(Path(shape_names)) if shape_names else None
    results = []
    for way, shot, fold, path in fewshot_files(Path(root)):
        samples, class_names = fewshot_samples(path, trust_pickle, names)
        target = Path(out_dir) / f"{way}way{shot}shot" / f"{fold}.zarr"
        results.append(write_classification_store(
            target, samples, class_names, n_points or _native_points(samples),
            {"format": "fewshot-pkl", "way": way, "shot": shot, "fold": fold},
            {"source": str(path.resolve())}, normals, chunk_rows, fps=fps, log=log))
    return results


# ----------------------------------------------------------------------------- ScanObjectNN


def scanobjectnn_files(root: Path, variant: str) -> dict[str, Path]:
    if variant not in SCANOBJECTNN_FILES:
        raise ValueError(f"unknown ScanObjectNN variant {variant!r}; choose from {list(SCANOBJECTNN_FILES)}")
    folder, train, test = SCANOBJECTNN_FILES[variant]
    root = Path(root)
    base = root / folder if (root / folder).is_dir() else root
    files = {"train": base / train, "test": base / test}
    for path in files.values():
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (ScanObjectNN {variant} expects "
                                    f"{folder}/{train} and {folder}/{test})")
    return files


def scanobjectnn_samples(root: Path, variant: str = "PB_T50_RS") -> list[Sample]:
    import h5py

    samples = []
    for split, path in scanobjectnn_files(root, variant).items():
        with h5py.File(path, "r") as f:
            data = np.asarray(f["data"][:], dtype=np.float32)
            labels = np.asarray(f["label"][:]).reshape(-1).astype(np.int64)
        if data.ndim != 3 or data.shape[0] != labels.shape[0]:
            raise ValueError(f"{path}: data {data.shape} and label {labels.shape} do not match")
        samples += [Sample(f"{split}-{i:05d}", split, int(labels[i]), lambda c=data[i]: c)
                    for i in range(len(labels))]
    return samples


def convert_scanobjectnn(root: str | Path, out: str | Path, variant: str = "PB_T50_RS",
                         n_points: int | None = None, chunk_rows: int = 16, fps: FarthestPoints | None = None,
                         log=print) -> ConvertResult:
    samples = scanobjectnn_samples(Path(root), variant)
    n_points = n_points or _native_points(samples)
    return write_classification_store(out, samples, SCANOBJECTNN_CLASSES, n_points,
                                      {"format": "scanobjectnn", "variant": variant},
                                      {"source": str(Path(root).resolve())}, False, chunk_rows,
                                      fps=fps, log=log)


# ----------------------------------------------------------------------------- project points


def points_samples(cache: Path) -> tuple[list[Sample], list[str], list[str]]:
    """Samples from ``cache/points.zarr`` with category and split from ``cache/shapes.parquet``."""
    import polars as pl

    shapes_path = layout.CacheLayout(cache).shapes
    if not shapes_path.exists():
        raise FileNotFoundError(f"{shapes_path} not found: run the index and sample stages first")
    shapes = pl.read_parquet(shapes_path)
    store = open_store(layout.CacheLayout(cache).points, expect_ids=shapes["id"].to_list(),
                       expect_arrays={"points": (-1, 3)})
    names = sorted(shapes["category"].unique().to_list())
    present = set(shapes["split"].unique().to_list())
    splits = [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))
    lookup = {c: i for i, c in enumerate(names)}
    array = store["points"]

    def load(row: int) -> np.ndarray:
        if not store.ok[row]:
            raise ValueError("this shape failed an earlier stage (no points)")
        return np.asarray(array[row])

    samples = [Sample(sid, split, lookup[cat], lambda r=row: load(r))
               for row, (sid, cat, split) in enumerate(zip(shapes["id"], shapes["category"], shapes["split"]))]
    return samples, names, splits


def convert_points(cache: str | Path, out: str | Path, n_points: int | None = None,
                   chunk_rows: int = 16, fps: FarthestPoints | None = None, log=print) -> ConvertResult:
    samples, names, splits = points_samples(Path(cache))
    store = open_store(layout.CacheLayout(cache).points)
    n_points = n_points or int(store["points"].shape[1])
    return write_classification_store(out, samples, names, n_points,
                                      {"format": "points", "points_store": store.params},
                                      {"source": relative_to_store(cache, out)}, False, chunk_rows,
                                      splits=splits, fps=fps, log=log)


def _native_points(samples: Sequence[Sample]) -> int:
    """The point count of the source, which must be the same for every shape."""
    counts = {np.asarray(s.load()).shape[0] for s in samples[:64]}
    if len(counts) != 1:
        raise ValueError(f"shapes have different point counts {sorted(counts)}: pass n_points")
    return counts.pop()
