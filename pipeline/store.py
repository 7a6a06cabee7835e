"""The zarr store layer: every stage writes and reads per-shape arrays through here.

A store is a zarr v3 group aligned to the rows of ``shapes.parquet``:

- ``ids``   str  [N]  the shape id of every row (so misalignment is detected, not assumed)
- ``done``  bool [N]  the row was processed (successfully or not)
- ``ok``    bool [N]  the row was processed successfully (failed rows are excluded downstream)
- one or more data arrays ``[N, ...]``, chunked along N and Blosc/zstd compressed.

Attributes: ``params`` (everything that determines the content; a resume requires equality),
``provenance`` (free-form, informational), ``complete`` (set last), ``schema``.

Writes go to ``<path>.partial``. A killed writer leaves the partial store behind; the next run
with the same ids and params resumes from its ``done`` mask. Chunk writes are atomic in zarr's
LocalStore, and ``done`` is written after the data of the same rows, so a row that reads as done
is complete. ``finalise`` renames the partial store into place, so a store at ``path`` always
reads as complete.

Sharding (:class:`Shard`, from ``RANK``/``WORLD_SIZE``: torchrun, or a SLURM array job that sets
them): processes on one or several machines write disjoint chunks (chunk ``k`` belongs to rank
``k % world``) of the same partial store on a shared filesystem, with no communication. The
partial store is created atomically (built aside, renamed into place; a process that loses the
race opens the winner's), only rank 0 discards a stale one (the others wait for it), every rank
keeps its own failure log, and whichever process finds every row done finalises, claimed by an
atomic ``mkdir`` so that exactly one does. The result is the store one process would write.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from zarr.errors import ZarrUserWarning

from pipeline import layout

SCHEMA_VERSION = 1
RESERVED = ("ids", "done", "ok")
FAILURE_LOG = "failures.jsonl"
FINALISING = ".finalising"  # inside a partial store: one process has claimed its finalisation
SHARD_WAIT_S = float(os.environ.get("RECON_SHARD_WAIT_S", "600"))


class StoreError(RuntimeError):
    """A store is missing, incomplete, or does not match what the reader expects."""


@dataclass(frozen=True)
class ArraySpec:
    """One per-row data array: its per-row shape, dtype and rows per chunk."""

    row_shape: tuple[int, ...]
    dtype: str
    chunk_rows: int = 16


@dataclass(frozen=True)
class Shard:
    """This process's share of a store: the chunks ``k`` with ``k % world == rank``."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"RANK {self.rank} is not in 0..WORLD_SIZE-1 ({self.world})")

    @classmethod
    def from_env(cls) -> "Shard":
        """``RANK``/``WORLD_SIZE``: set by torchrun, or by hand (a SLURM array job:
        ``RANK=$SLURM_ARRAY_TASK_ID WORLD_SIZE=$SLURM_ARRAY_TASK_COUNT``). Unset: one process."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world}"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _compressor() -> zarr.codecs.BloscCodec:
    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def json_native(obj: Any) -> Any:
    """JSON round trip (tuples become lists, numpy scalars and paths plain values), so params
    compare equal after being stored."""
    return json.loads(json.dumps(obj, default=_json_default, sort_keys=True))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def relative_to_store(path: str | Path, store_path: str | Path) -> str:
    """Another file or store as a store's attrs name it: relative to the store's folder, so that a
    store's bytes do not depend on where the clone lives."""
    import os

    return Path(os.path.relpath(Path(path).resolve(), Path(store_path).resolve().parent)).as_posix()


def _read_ids(group: zarr.Group) -> np.ndarray:
    return np.asarray([str(i) for i in group["ids"][:]])


def array_names(group: zarr.Group) -> list[str]:
    """The arrays of a group. The failure logs live inside the store folder so that they move with
    it when it is finalised; zarr lists every object of the folder and warns that a file is "not
    recognized as a component of a Zarr hierarchy". Those files are ours: only that warning, only
    for them, is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at (.*/)?failures(\.rank\d+)?\.jsonl(\.tmp)? is not recognized",
                                category=ZarrUserWarning)
        return list(group.array_keys())


def _failure_logs(store_dir: Path) -> list[Path]:
    """The store's failure log, then one per rank of a sharded writer."""
    store_dir = Path(store_dir)
    return [p for p in [store_dir / FAILURE_LOG, *sorted(store_dir.glob("failures.rank*.jsonl"))] if p.exists()]


def read_failure_log(store_dir: Path) -> dict[str, dict]:
    """The failure records kept inside a store (latest per shape id)."""
    latest: dict[str, dict] = {}
    for log in _failure_logs(store_dir):
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            latest[record["id"]] = record
    return latest


def _diff(expected: dict, found: dict) -> list[str]:
    keys = sorted(set(expected) | set(found))
    return [f"{k}: expected {expected.get(k)!r}, found {found.get(k)!r}"
            for k in keys if expected.get(k) != found.get(k)]


class StoreWriter:
    """Resumable, chunk-aligned writer of one store, or of one shard of it (see module docstring)."""

    def __init__(self, path: Path, group: zarr.Group, arrays: dict[str, ArraySpec], shard: Shard | None = None):
        self.path = path
        self.group = group
        self.arrays = arrays
        self.shard = shard or Shard()
        self.n = int(group["ids"].shape[0])

    @classmethod
    def open(cls, path: str | Path, ids: Sequence[str], arrays: dict[str, ArraySpec],
             params: dict, provenance: dict | None = None,
             log=print, shard: Shard | None = None) -> "StoreWriter | None":
        """Open ``path.partial`` for writing, resuming when it matches (creating it when absent).

        Returns None when a complete store with the same ids and params is already at ``path``.
        """
        path = Path(path)
        shard = shard or Shard()
        params = json_native(params)
        ids = [str(i) for i in ids]
        if path.exists():
            try:
                existing = open_store(path, expect_ids=ids, expect_params=params)
                if existing.attrs.get("schema") == SCHEMA_VERSION:
                    return None
            except StoreError as err:
                log(f"[yellow]rebuilding {path}[/]: {err}")
        tmp = partial_path(path)
        deadline = time.monotonic() + SHARD_WAIT_S
        while True:
            if tmp.exists():
                reason = cls._resume_problem(tmp, ids, arrays, params)
                if reason is None:
                    writer = cls(path, zarr.open_group(tmp, mode="r+"), arrays, shard)
                    writer._drop_stale_claim(log)
                    log(f"resuming {tmp}: {int(writer.done_mask().sum())}/{writer.n} rows already done")
                    return writer
                if shard.rank != 0:  # only rank 0 replaces a stale store: two replacers could drop each other's
                    if time.monotonic() > deadline:
                        raise StoreError(f"{tmp} does not match this run ({reason}) and rank 0 did not replace it "
                                         f"within {SHARD_WAIT_S:.0f} s ($RECON_SHARD_WAIT_S)")
                    time.sleep(1.0)
                    continue
                log(f"[yellow]discarding stale partial store {tmp}[/]: {reason}")
                shutil.rmtree(tmp)
            writer = cls._create(path, tmp, ids, arrays, params, provenance or {}, shard)
            if writer is not None:
                return writer
            # another process created it first: open theirs

    @staticmethod
    def _resume_problem(tmp: Path, ids: list[str], arrays: dict[str, ArraySpec],
                        params: dict) -> str | None:
        try:
            group = zarr.open_group(tmp, mode="r")
            found_params = group.attrs.get("params", {})
            if found_params != params:
                return "params changed (" + "; ".join(_diff(params, found_params)) + ")"
            if _read_ids(group).tolist() != ids:
                return "the shape ids differ from the shapes table"
            for name, spec in arrays.items():
                arr = group[name]
                if tuple(arr.shape[1:]) != tuple(spec.row_shape) or str(arr.dtype) != spec.dtype:
                    return f"array {name!r} has shape {arr.shape} {arr.dtype}"
        except Exception as err:  # unreadable metadata: nothing to resume from
            return f"unreadable ({type(err).__name__}: {err})"
        return None

    @classmethod
    def _create(cls, path: Path, tmp: Path, ids: list[str], arrays: dict[str, ArraySpec],
                params: dict, provenance: dict, shard: Shard) -> "StoreWriter | None":
        """Build the empty store aside, then rename it to ``tmp``; None when another process's
        store got there first."""
        for name in arrays:
            if name in RESERVED:
                raise ValueError(f"array name {name!r} is reserved")
        n = len(ids)
        chunk = max([spec.chunk_rows for spec in arrays.values()] + [1])
        aside = tmp.with_name(f"{tmp.name}.{socket.gethostname()}-{os.getpid()}.tmp")
        shutil.rmtree(aside, ignore_errors=True)
        group = zarr.open_group(aside, mode="w")
        group.create_array("ids", shape=(n,), dtype=str, chunks=(max(n, 1),))
        if n:
            group["ids"][:] = np.asarray(ids, dtype=object)
        for flag in ("done", "ok"):
            group.create_array(flag, shape=(n,), dtype="bool", chunks=(chunk,), fill_value=False)
        for name, spec in arrays.items():
            group.create_array(name, shape=(n, *spec.row_shape), dtype=spec.dtype,
                               chunks=(spec.chunk_rows, *spec.row_shape),
                               compressors=_compressor(), fill_value=0)
        group.attrs.update({"schema": SCHEMA_VERSION, "params": params,
                            "provenance": json_native(provenance), "complete": False})
        try:
            aside.rename(tmp)  # atomic; fails when tmp exists (it is never an empty folder)
        except OSError:
            shutil.rmtree(aside, ignore_errors=True)
            if tmp.exists():
                return None
            raise
        return cls(path, zarr.open_group(tmp, mode="r+"), arrays, shard)

    def _drop_stale_claim(self, log) -> None:
        """A finalisation claim left by a process killed while finalising (it takes milliseconds,
        so a claim older than a minute is stale): remove it so the store can be finalised."""
        claim = partial_path(self.path) / FINALISING
        try:
            if time.time() - claim.stat().st_mtime > 60:
                claim.rmdir()
                log(f"removed a stale finalisation claim in {partial_path(self.path)}")
        except FileNotFoundError:
            pass

    @property
    def chunk_rows(self) -> int:
        return int(self.group["done"].chunks[0])

    def done_mask(self) -> np.ndarray:
        """Rows already written. A chunk whose mask cannot be read counts as not done."""
        done = np.zeros(self.n, dtype=bool)
        try:
            arr = self.group["done"]
        except Exception:  # the partial store was finalised (renamed) by another shard meanwhile
            return done
        for start in range(0, self.n, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.n)
            try:
                done[start:stop] = arr[start:stop]
            except Exception:
                pass
        return done

    def pending_blocks(self, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Chunk-aligned blocks of row indices that still need work (optionally within ``rows``),
        in the chunks this writer's shard owns."""
        todo = ~self.done_mask()
        if rows is not None:
            keep = np.zeros(self.n, dtype=bool)
            keep[rows] = True
            todo &= keep
        for start in range(0, self.n, self.chunk_rows):
            if not self.shard.owns(start // self.chunk_rows):
                continue
            block = np.flatnonzero(todo[start:start + self.chunk_rows]) + start
            if block.size:
                yield block

    def all_done(self) -> bool:
        """Every row of every shard is written: the store can be finalised."""
        return bool(self.done_mask().all())

    def write_rows(self, rows: np.ndarray, data: dict[str, np.ndarray], ok: np.ndarray) -> None:
        """Write the data of ``rows`` (all within one chunk), then mark them done."""
        rows = np.asarray(rows)
        if rows.size == 0:
            return
        lo, hi = int(rows.min()), int(rows.max()) + 1
        for name, values in data.items():
            arr = self.group[name]
            if lo // arr.chunks[0] != (hi - 1) // arr.chunks[0]:
                raise ValueError("write_rows needs rows inside one chunk")
            block = arr[lo:hi]
            block[rows - lo] = values
            arr[lo:hi] = block
        flags = {"ok": np.asarray(ok, dtype=bool), "done": np.ones(rows.size, dtype=bool)}
        for name in ("ok", "done"):  # done last: a row reads as done only when all is written
            arr = self.group[name]
            block = arr[lo:hi]
            block[rows - lo] = flags[name]
            arr[lo:hi] = block

    def add_array(self, name: str, values: np.ndarray, dtype: str | type = str) -> None:
        """A small whole array that is not per row (e.g. the prompt templates)."""
        if name in RESERVED:
            raise ValueError(f"array name {name!r} is reserved")
        arr = self.group.create_array(name, shape=values.shape, dtype=dtype, overwrite=True,
                                      chunks=tuple(max(s, 1) for s in values.shape))
        if values.size:
            arr[...] = values

    @property
    def _failure_log(self) -> Path:
        name = FAILURE_LOG if self.shard.world == 1 else f"failures.rank{self.shard.rank}.jsonl"
        return partial_path(self.path) / name

    def record_failure(self, shape_id: str, stage: str, error: str, message: str) -> None:
        """Append a failed row's reason; it survives a kill, so a resumed run still reports it."""
        record = {"id": shape_id, "stage": stage, "error": error, "message": message}
        with open(self._failure_log, "a") as log:
            log.write(json.dumps(record) + "\n")

    def failures(self) -> list[dict]:
        """Recorded failures of rows that are done and not ok (latest record per id)."""
        latest = read_failure_log(partial_path(self.path))
        done, ok = self.done_mask(), np.asarray(self.group["ok"][:], dtype=bool)
        failed_ids = set(_read_ids(self.group)[done & ~ok].tolist())
        return [r for i, r in sorted(latest.items()) if i in failed_ids]

    def finalise(self, provenance: dict | None = None) -> Path | None:
        """Mark complete and rename into place. Refuses while rows are pending. Returns None when
        another process (a shard of the same store) claimed the finalisation first."""
        tmp = partial_path(self.path)
        try:
            (tmp / FINALISING).mkdir()  # atomic, also on NFS: exactly one process finalises
        except (FileExistsError, FileNotFoundError):
            return None
        pending = int((~self.done_mask()).sum())
        if pending:
            (tmp / FINALISING).rmdir()
            raise StoreError(f"{pending} rows of {tmp} are not done yet")
        self._merge_failure_logs()
        if provenance:
            merged = dict(self.group.attrs.get("provenance", {}))
            merged.update(json_native(provenance))
            self.group.attrs["provenance"] = merged
        self.group.attrs["complete"] = True
        (tmp / FINALISING).rmdir()
        if self.path.exists():  # an older store: moved aside first, so a reader never sees half of it
            old = self.path.with_name(f"{self.path.name}.old-{socket.gethostname()}-{os.getpid()}")
            self.path.rename(old)
            shutil.rmtree(old)
        tmp.rename(self.path)
        return self.path

    def _merge_failure_logs(self) -> None:
        """One ``failures.jsonl``: the latest record of each failed row, in row order (the same
        bytes whatever the number of shards or interruptions)."""
        folder = partial_path(self.path)
        latest = read_failure_log(folder)
        done, ok = self.done_mask(), np.asarray(self.group["ok"][:], dtype=bool)
        failed = [str(i) for i in _read_ids(self.group)[done & ~ok]]
        lines = "".join(json.dumps(latest[i]) + "\n" for i in failed if i in latest)
        logs = _failure_logs(folder)
        if lines or logs:
            (folder / (FAILURE_LOG + ".tmp")).write_text(lines)
            (folder / (FAILURE_LOG + ".tmp")).replace(folder / FAILURE_LOG)
        for log in logs:
            if log.name != FAILURE_LOG:
                log.unlink()


@dataclass
class Store:
    """A complete store opened read-only."""

    path: Path
    group: zarr.Group
    ids: np.ndarray
    ok: np.ndarray
    attrs: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> zarr.Array:
        return self.group[name]

    @property
    def params(self) -> dict:
        return self.attrs.get("params", {})

    @property
    def provenance(self) -> dict:
        return self.attrs.get("provenance", {})

    def data_arrays(self) -> list[str]:
        return sorted(k for k in array_names(self.group) if k not in RESERVED)

    @property
    def rows_are_categories(self) -> bool:
        """The text-teacher store: rows are categories ([C, T, D] features), not shapes."""
        return "features" in self.group and self.group["features"].ndim == 3


def open_store(path: str | Path, expect_ids: Sequence[str] | None = None,
               expect_params: dict | None = None,
               expect_arrays: dict[str, tuple[int, ...]] | None = None) -> Store:
    """Open a complete store read-only and validate it, or raise StoreError saying what is wrong.

    ``expect_params`` is matched key by key (only the keys given); ``expect_arrays`` maps an array
    name to its expected per-row shape, where ``-1`` accepts any size on that axis.
    """
    path = Path(path)
    if not path.exists():
        hint = " (a partial store exists: rerun its stage to finish it)" if partial_path(path).exists() else ""
        raise StoreError(f"{path} does not exist{hint}")
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
        ids = _read_ids(group)
        ok = np.asarray(group["ok"][:], dtype=bool)
    except Exception as err:
        raise StoreError(f"{path} is not a readable recon store: {type(err).__name__}: {err}") from err
    if not attrs.get("complete"):
        raise StoreError(f"{path} is incomplete (its writer did not finish)")
    if expect_ids is not None:
        expect = np.asarray([str(i) for i in expect_ids])
        if expect.shape != ids.shape:
            raise StoreError(f"{path} has {ids.size} rows, the shapes table has {expect.size}")
        bad = np.flatnonzero(expect != ids)
        if bad.size:
            i = int(bad[0])
            raise StoreError(f"{path} is misaligned with the shapes table: row {i} is "
                             f"{str(ids[i])!r}, expected {str(expect[i])!r} ({bad.size} rows differ)")
    if expect_params:
        found = attrs.get("params", {})
        wanted = json_native(expect_params)
        problems = _diff(wanted, {k: found.get(k) for k in wanted})
        if problems:
            raise StoreError(f"{path} was made with other params: " + "; ".join(problems))
    for name, row_shape in (expect_arrays or {}).items():
        if name not in group:
            raise StoreError(f"{path} has no array {name!r}")
        shape = tuple(group[name].shape[1:])
        if len(shape) != len(row_shape) or any(e not in (-1, s) for e, s in zip(row_shape, shape)):
            raise StoreError(f"{path}: array {name!r} has rows of shape {shape}, expected {tuple(row_shape)}")
    return Store(path=path, group=group, ids=ids, ok=ok, attrs=attrs)


def find_shapes(store_path: str | Path) -> Path | None:
    """The ``shapes.parquet`` next to a store, or one folder up (``cache/teachers/image.zarr``)."""
    store_path = Path(store_path)
    return next((d / layout.SHAPES for d in (store_path.parent, store_path.parent.parent)
                 if (d / layout.SHAPES).exists()), None)


def _polars_dtype(arr: zarr.Array):
    """The polars type of one row of a data array: strings, or numbers (float16 read as float32,
    which polars has; rows of ndim >= 1 become a fixed-size ``pl.Array``)."""
    import polars as pl

    if arr.dtype.kind in "OTU":
        return pl.String
    dtype = np.float32 if arr.dtype == np.float16 else arr.dtype
    return pl.Series(np.empty((0, *arr.shape[1:]), dtype=dtype)).dtype


def scan(path: str | Path, shapes: str | Path | None = None):
    """A store as a polars LazyFrame, read one chunk of rows at a time.

    Columns: ``id``, ``category`` and ``split`` (from the shapes table, found next to the store
    or given; not for the text store, whose rows are categories), ``ok``, then every per-row data
    array as a ``pl.Array`` column (float16 as float32). A query decodes only the arrays it
    selects; a filter on the cheap columns (id, category, split, ok) runs before any array of a
    chunk is decoded and skips chunks it rejects whole; ``head(n)`` stops reading after n rows.
    Batches are the store's chunks of rows, so streaming queries (group_by, sink_parquet,
    ``collect_batches``, ``collect(engine="streaming")``) run in memory bounded by a few chunks.
    """
    import polars as pl
    from polars.io.plugins import register_io_source

    store = open_store(path)
    n = int(store.ids.size)
    cheap: dict[str, pl.Series] = {"id": pl.Series("id", store.ids.astype(str), dtype=pl.String)}
    shapes = Path(shapes) if shapes else find_shapes(store.path)
    if shapes is not None and shapes.exists() and not store.rows_are_categories:
        table = pl.read_parquet(shapes, columns=["id", "category", "split"]).unique("id", keep="first")
        aligned = cheap["id"].to_frame().join(table, on="id", how="left", maintain_order="left")
        cheap.update(category=aligned["category"].cast(pl.String), split=aligned["split"].cast(pl.String))
    cheap["ok"] = pl.Series("ok", store.ok)
    arrays = [name for name in store.data_arrays() if store[name].shape[0] == n]  # not e.g. templates
    schema = {**{name: column.dtype for name, column in cheap.items()},
              **{name: _polars_dtype(store[name]) for name in arrays}}
    step = max(int(store["ok"].chunks[0]), *(int(store[name].chunks[0]) for name in arrays), 1)

    def read_array(name: str, lo: int, hi: int, keep: np.ndarray | None) -> pl.Series:
        values = np.asarray(store[name][lo:hi])  # whole chunks: zarr decodes chunks anyway
        if keep is not None:
            values = values[keep]
        if schema[name] == pl.String:
            return pl.Series(name, values.astype(str), dtype=pl.String)
        return pl.Series(name, values.astype(np.float32) if values.dtype == np.float16 else values)

    def batches(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                batch_size: int | None):
        wanted = list(with_columns) if with_columns is not None else list(schema)
        roots = predicate.meta.root_names() if predicate is not None else []
        needed = list(dict.fromkeys([*wanted, *roots]))
        early = bool(roots) and all(c in cheap for c in roots)  # decide rows before decoding arrays
        left = n_rows
        for lo in range(0, n, step):
            if left is not None and left <= 0:
                return
            hi = min(lo + step, n)
            columns = [cheap[c].slice(lo, hi - lo) for c in needed if c in cheap]
            keep = None
            if early:
                keep = pl.DataFrame(columns).select(predicate.fill_null(False)).to_series().to_numpy()
                if not keep.any():
                    continue
                columns = [column.filter(keep) for column in columns]
            frame = pl.DataFrame(columns + [read_array(c, lo, hi, keep) for c in needed if c not in cheap])
            if predicate is not None and not early:
                frame = frame.filter(predicate)
            frame = frame.select(wanted)
            if left is not None:
                frame = frame.head(left)
                left -= frame.height
            yield frame

    return register_io_source(batches, schema=schema, is_pure=True, explain_name="recon store",
                              explain_detail=str(store.path))


def to_polars(path: str | Path, shapes: str | Path | None = None):
    """A store as one polars DataFrame (``scan(path, shapes).collect()``): fine for small stores;
    use :func:`scan` for anything that does not fit in memory twice."""
    return scan(path, shapes).collect()


def content_key(path: str | Path) -> str:
    """A cheap identity of a complete store's content: its attrs plus the name, size and mtime of
    every file in it (a store is written once and replaced whole, so a rewrite changes the key).
    Independent of where the store lives."""
    import hashlib
    import os

    path = Path(path)
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            rel = os.path.relpath(os.path.join(folder, name), path)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def decompress_to_npy(array: zarr.Array, target: Path, block_bytes: int = 256 << 20, log=None) -> Path:
    """Decompress a zarr array once into an uncompressed ``.npy`` file that readers memory-map:
    chunk-aligned blocks of at most ~``block_bytes`` (memory stays bounded whatever the size),
    into a temporary file that is renamed into place, under an exclusive lock so that processes
    on one machine (DDP ranks) decompress it once between them. A file already there is reused."""
    import fcntl
    import os

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the process dies, so a kill cannot wedge it
        if target.exists():
            return target
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=array.dtype, shape=array.shape)
        chunk = int(array.chunks[0])
        row_bytes = max(int(np.prod(array.shape[1:])) * array.dtype.itemsize, 1)
        step = max(chunk, block_bytes // row_bytes // chunk * chunk)
        for start in range(0, array.shape[0], step):
            out[start:start + step] = array[start:start + step]
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(target)
        if log:
            log(f"decompressed {array.shape} {array.dtype} into {target}")
    return target
