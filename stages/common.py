"""Helpers every stage shares: paths, result files, progress bars, worker pools, failure tables
(the parameters: :mod:`stages.params`)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import signal
import time
import traceback
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import polars as pl
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline import layout
from pipeline.store import json_native

console = Console(stderr=True)

FAILURE_SCHEMA = {"id": pl.Utf8, "stage": pl.Utf8, "error": pl.Utf8, "message": pl.Utf8}


class StageError(RuntimeError):
    """A stage cannot run; the message says why and what to do."""


def cache_dir() -> Path:
    """Where stores live: ``$RECON_CACHE`` or ``./cache``."""
    return Path(os.environ.get("RECON_CACHE", layout.DEFAULT_CACHE))


def metrics_dir(out: Path) -> Path:
    """Where a stage whose outputs live in ``cache/<stage>`` writes what ``dvc metrics`` and
    ``dvc plots`` compare (the headline metrics.json, history.csv, confusion.csv; beside them
    details.json, an uncached out that no metrics entry declares): ``cache/metrics/<stage>``.
    Unlike the rest of cache/ these small files are tracked by git (``cache: false`` in dvc.yaml),
    so every commit and every ``dvc exp`` carries its results; models, checkpoints, images and
    stores stay in ``cache/<stage>``, cached by DVC."""
    return layout.metrics_dir(out)


def publish(src: Path, dst: Path) -> Path:
    """Copy a small result file to its git-tracked place atomically (temporary file, then rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    return dst


def details_path(headline: Path) -> Path:
    """The file beside a headline metrics file that keeps every figure of the run (an uncached
    out, not a metrics file): ``metrics.json`` → ``details.json``, ``check.json`` →
    ``check_details.json``."""
    name = "details.json" if headline.name == "metrics.json" else f"{headline.stem}_details.json"
    return headline.with_name(name)


def check_headline(headline: dict) -> dict:
    """A headline is flat, its values numbers (or booleans): one column each in `dvc metrics show`."""
    bad = {k: v for k, v in headline.items() if not isinstance(k, str) or not isinstance(v, (int, float))}
    if bad:
        raise ValueError(f"a headline holds numbers only, not {bad}")
    return headline


def write_metrics(path: Path, details: dict, headline: dict) -> Path:
    """Write a stage's results into its git-tracked folder: ``details`` (every figure, nested, with
    the options behind them) to :func:`details_path` and ``headline`` (the few numbers compared
    across experiments) to ``path``, the file dvc.yaml declares under ``metrics:`` so that
    `dvc metrics show` and `dvc exp show` fit a screen. Each file is written atomically, details
    first: a headline on disk always has its details beside it."""
    from recon.runtime import trainstate

    headline = check_headline(headline)
    trainstate.write_json(details_path(path), details)
    trainstate.write_json(path, headline)
    return path


class RateColumn(ProgressColumn):
    """Items per second, with the unit given to the progress bar."""

    def __init__(self, unit: str = "shapes"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def progress(unit: str = "shapes") -> Progress:
    """A rich progress bar with count, rate, elapsed time and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=False)


class LossBar:
    """A rich progress bar for one training epoch showing the running loss terms (pretrain, finetune)."""

    def __init__(self, title: str, total: int):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[losses]}"), TimeRemainingColumn(), console=console)
        self.progress.start()
        self.task = self.progress.add_task(title, total=total, losses="")

    def update(self, **losses: float) -> None:
        self.progress.update(self.task, advance=1,
                             losses=" ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    def close(self) -> None:
        self.progress.stop()


@dataclass
class Outcome:
    """What one unit of work gave: data, or an error class and message; plus its warnings."""

    index: int
    data: Any = None
    error: str | None = None
    message: str | None = None
    warnings: tuple[str, ...] = ()


def _guarded(fn: Callable[[Any], Any], indexed_item: tuple[int, Any]) -> Outcome:
    index, item = indexed_item
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = fn(item)
            return Outcome(index, data=data, warnings=tuple(str(w.message) for w in caught))
        except Exception as err:  # one bad input must not stop the stage
            kind = getattr(err, "kind", None) or type(err).__name__
            message = str(err) or traceback.format_exc(limit=1)
            return Outcome(index, error=kind, message=message,
                           warnings=tuple(str(w.message) for w in caught))


def map_guarded(fn: Callable[[Any], Any], items: Iterable[tuple[int, Any]],
                workers: int, in_flight: int = 4,
                worker_init: Callable[[], None] | None = None) -> Iterator[Outcome]:
    """Apply ``fn`` to each (index, item), in order, in a pool of ``workers`` processes (or
    in-process when 1), each started with ``worker_init()``. Exceptions become failed Outcomes.
    At most ``in_flight`` items per worker are submitted ahead of the consumer, so memory stays
    bounded whatever the number of items (``Executor.map`` would submit them all at once and
    hold every finished result)."""
    work = partial(_guarded, fn)
    if workers <= 1:
        yield from map(work, items)
        return
    context = multiprocessing.get_context("spawn")  # no forked GL/torch state in workers
    items = iter(items)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=worker_init) as pool:
        window = deque(pool.submit(work, item) for item in islice(items, workers * in_flight))
        while window:
            outcome = window.popleft().result()
            for item in islice(items, 1):
                window.append(pool.submit(work, item))
            yield outcome


def write_failures(stage: str, records: list[dict], folder: Path | None = None) -> Path:
    """``cache/failures/<stage>.parquet``: one row per failed shape (written even when empty)."""
    folder = folder or layout.CacheLayout(cache_dir()).failures
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}.parquet"
    table = pl.DataFrame(records, schema=FAILURE_SCHEMA) if records else pl.DataFrame(schema=FAILURE_SCHEMA)
    tmp = path.with_suffix(f".parquet.{os.getpid()}.tmp")  # several shards may write it at once
    table.write_parquet(tmp)
    tmp.replace(path)
    return path


def read_shapes(path: Path | None = None, mesh_paths: bool = False) -> pl.DataFrame:
    """The shapes table; with ``mesh_paths``, its ``mesh_path`` column made absolute (the table
    stores paths relative to the indexed root)."""
    path = path or layout.CacheLayout(cache_dir()).shapes
    if not path.exists():
        raise StageError(f"{path} not found: run `recon index ROOT` first")
    table = pl.read_parquet(path)
    if mesh_paths:
        from pipeline.discover import resolve_mesh_paths

        table = resolve_mesh_paths(table, path)
    return table


def summarise(stage: str, n_total: int, n_failed: int, seconds: float, strict: bool,
              failures_path: Path) -> None:
    """Print the stage summary; raise under --strict when anything failed."""
    ok = n_total - n_failed
    style = "green" if not n_failed else "yellow"
    console.print(f"[{style}]{stage}: {ok}/{n_total} shapes ok, {n_failed} failed "
                  f"({seconds:.1f} s)[/]" + (f"; failures in {failures_path}" if n_failed else ""))
    if strict and n_failed:
        raise StageError(f"{stage}: {n_failed} shapes failed and --strict is set (see {failures_path})")


def as_jsonable(params: Any) -> dict:
    """A params dataclass as JSON-native values (what stores record)."""
    return json_native(dataclasses.asdict(params))


def fault_injection(rows: np.ndarray) -> None:
    """Tests kill a stage (SIGKILL, no cleanup) right after the block holding row
    ``$RECON_KILL_AFTER_ROW`` is written, to prove that a resumed run loses nothing."""
    target = os.environ.get("RECON_KILL_AFTER_ROW")
    if target is not None and int(target) in rows:
        os.kill(os.getpid(), signal.SIGKILL)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
