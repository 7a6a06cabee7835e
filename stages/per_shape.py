"""The loop shared by per-shape stages (render, sample): resumable, pooled, failure-tolerant,
and sharded by chunk across processes or machines (``RANK``/``WORLD_SIZE``, see
:class:`pipeline.store.Shard`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from pipeline import layout
from pipeline.store import ArraySpec, Shard, StoreWriter, open_store, partial_path, read_failure_log
from stages.common import Timer, cache_dir, console, fault_injection, map_guarded, progress, summarise, write_failures


def run_per_shape(stage: str, table: pl.DataFrame, store_path: Path,
                  arrays: dict[str, ArraySpec], store_params: dict, provenance: dict,
                  fn: Callable[[dict], dict[str, np.ndarray]], workers: int = 1,
                  limit: int | None = None, strict: bool = False,
                  failures_dir: Path | None = None,
                  worker_init: Callable[[], None] | None = None) -> bool:
    """Compute ``fn(row) -> {array: values}`` for every shape row into a store.

    Rows already done in a partial store are skipped; failed rows are recorded, marked not ok
    and written as zeros. ``limit`` processes at most that many pending rows and leaves the
    store partial (resumable). Under ``RANK``/``WORLD_SIZE`` this process does its shard's
    chunks; whichever shard finishes last finalises. ``worker_init`` starts each pool worker.
    Returns True when the store is complete.
    """
    ids = table["id"].to_list()
    shard = Shard.from_env()
    writer = StoreWriter.open(store_path, ids, arrays, store_params, provenance, log=console.print, shard=shard)
    if writer is None:
        console.print(f"{stage}: {store_path} is up to date ({len(ids)} shapes)")
        store = open_store(store_path)
        if shard.rank == 0:
            write_failures(stage, store_failures(store_path), failures_dir)
        summarise(stage, len(ids), int((~store.ok).sum()), 0.0, strict, _failures_file(stage, failures_dir))
        return True

    rows = table.to_dicts()
    blocks = list(writer.pending_blocks())
    todo = [int(r) for block in blocks for r in block]
    if limit is not None:
        todo = todo[:limit]
    keep = set(todo)
    blocks = [np.array([r for r in b if r in keep]) for b in blocks]
    blocks = [b for b in blocks if b.size]

    with Timer() as timer, progress() as bar:
        task = bar.add_task(stage + (f" ({shard})" if shard.world > 1 else ""), total=len(todo))
        outcomes = map_guarded(fn, ((r, rows[r]) for r in todo), workers, worker_init=worker_init)
        for block in blocks:
            data = {name: np.zeros((block.size, *spec.row_shape), dtype=spec.dtype)
                    for name, spec in arrays.items()}
            ok = np.zeros(block.size, dtype=bool)
            for slot in range(block.size):
                outcome = next(outcomes)
                shape_id = rows[outcome.index]["id"]
                for message in outcome.warnings:
                    console.print(f"[yellow]warning[/] {shape_id}: {message}")
                if outcome.error is None:
                    for name in arrays:
                        data[name][slot] = outcome.data[name]
                    ok[slot] = True
                else:
                    writer.record_failure(shape_id, stage, outcome.error, outcome.message or "")
                    console.print(f"[red]failed[/] {shape_id}: {outcome.error}: {outcome.message}")
                bar.advance(task)
            writer.write_rows(block, data, ok)
            fault_injection(block)

    n_pending = int((~writer.done_mask()).sum())
    if n_pending:
        if limit is not None:
            console.print(f"[yellow]{stage}: stopped after --limit; {n_pending} shapes still pending in "
                          f"{partial_path(store_path)}. Run again to continue.[/]")
        else:
            console.print(f"{stage}: {shard} wrote its chunks ({len(todo)} shapes, {timer.seconds:.1f} s); "
                          f"{n_pending} shapes of other shards pending, the last shard to finish finalises")
        return False
    if writer.finalise() is None:  # another shard finished at the same moment and finalises
        return False
    # read from the finalised store: every shard's records merged (read before, another shard's last
    # failures could be missing, or its partial folder already renamed away)
    failures = store_failures(store_path)
    path = write_failures(stage, failures, failures_dir)
    summarise(stage, len(ids), len(failures), timer.seconds, strict, path)
    return True


def store_failures(store_path: Path) -> list[dict]:
    """The failure records of a finished store, by shape id: the same table whether the stage
    just finished it or found it up to date."""
    return [record for _, record in sorted(read_failure_log(store_path).items())]


def _failures_file(stage: str, failures_dir: Path | None) -> Path:
    return (failures_dir or layout.CacheLayout(cache_dir()).failures) / f"{stage}.parquet"
