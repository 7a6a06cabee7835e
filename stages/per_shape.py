"""The loop shared by per-shape stages (render, sample): resumable, pooled, failure-tolerant."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from pipeline.store import ArraySpec, StoreWriter, open_store, partial_path, read_failure_log
from stages.common import (Timer, cache_dir, console, fault_injection, map_guarded, progress,
                           summarise, write_failures)


def run_per_shape(stage: str, table: pl.DataFrame, store_path: Path,
                  arrays: dict[str, ArraySpec], store_params: dict, provenance: dict,
                  fn: Callable[[dict], dict[str, np.ndarray]], workers: int = 1,
                  limit: int | None = None, strict: bool = False,
                  failures_dir: Path | None = None) -> bool:
    """Compute ``fn(row) -> {array: values}`` for every shape row into a store.

    Rows already done in a partial store are skipped; failed rows are recorded, marked not ok
    and written as zeros. ``limit`` processes at most that many pending rows and leaves the
    store partial (resumable). Returns True when the store is complete.
    """
    ids = table["id"].to_list()
    writer = StoreWriter.open(store_path, ids, arrays, store_params, provenance, log=console.print)
    if writer is None:
        console.print(f"{stage}: {store_path} is up to date ({len(ids)} shapes)")
        store = open_store(store_path)
        failures = list(read_failure_log(store_path).values())
        write_failures(stage, failures, failures_dir)
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
        task = bar.add_task(stage, total=len(todo))
        outcomes = map_guarded(fn, ((r, rows[r]) for r in todo), workers)
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

    failures = writer.failures()
    n_pending = int((~writer.done_mask()).sum())
    if n_pending:
        console.print(f"[yellow]{stage}: stopped after --limit; {n_pending} shapes still pending in "
                      f"{partial_path(store_path)}. Run again to continue.[/]")
        return False
    writer.finalise()
    path = write_failures(stage, failures, failures_dir)
    summarise(stage, len(ids), len(failures), timer.seconds, strict, path)
    return True


def _failures_file(stage: str, failures_dir: Path | None) -> Path:
    return (failures_dir or cache_dir() / "failures") / f"{stage}.parquet"
