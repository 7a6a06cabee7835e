"""`recon inspect`: what is in a store (or the whole cache), and whether the teachers make sense."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
from rich.table import Table

from pipeline import layout
from pipeline.feature_stats import feature_report
from pipeline.store import open_store, scan
from stages.common import console

STORE_NAMES = layout.PRETRAINING_STORES


def clean_view_features(frame: pl.LazyFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per ok shape, its image-teacher feature of the clean variant averaged over views, and its
    category; read a chunk at a time, so memory holds [shapes, D], never the whole store."""
    features, labels = [], []
    for batch in frame.filter(pl.col("ok")).select("category", "features").collect_batches():
        features.append(batch["features"].to_numpy()[:, :, 0].mean(axis=1))  # [b, V, A, D] -> [b, D]
        labels.append(batch["category"].to_numpy())
    return np.concatenate(features or [np.zeros((0, 0), np.float32)]), np.concatenate(labels or [np.zeros(0, object)])


def _sample(features: np.ndarray, labels: np.ndarray, max_items: int, seed: int = 0):
    """At most ``max_items`` rows, seeded (the sanity statistics compare all pairs: O(items²))."""
    if len(labels) <= max_items:
        return features, labels
    rows = np.sort(np.random.default_rng(seed).choice(len(labels), max_items, replace=False))
    return features[rows], labels[rows]


def describe(path: Path, k: int = 5, max_items: int = 4096) -> dict:
    """A JSON-able summary of one store: counts per category/split, failures, provenance, and
    teacher sanity statistics for feature stores (on at most ``max_items`` seeded rows)."""
    store = open_store(path)
    report: dict = {"store": str(path), "rows": int(store.ids.size), "ok": int(store.ok.sum()),
                    "failed": int((~store.ok).sum()), "arrays": {
                        name: {"shape": list(store[name].shape), "dtype": str(store[name].dtype)}
                        for name in store.data_arrays()},
                    "params": store.params, "provenance": store.provenance}
    failures = path / "failures.jsonl"
    if failures.exists():
        report["failures"] = [json.loads(line) for line in failures.read_text().splitlines() if line.strip()]
    frame = scan(path)  # with category and split when a shapes table is found (not for the text store)
    is_text = store.rows_are_categories
    if "category" in frame.collect_schema():
        counts = frame.group_by("category", "split").agg(pl.len().alias("shapes"), pl.col("ok").sum().alias("ok"))
        report["counts"] = counts.sort("category", "split").collect().to_dicts()
        if "features" in store.data_arrays():
            clean, labels = clean_view_features(frame)
            report["teacher_sanity"] = feature_report(*_sample(clean, labels, max_items), k)
            if len(labels) > max_items:
                report["teacher_sanity"]["sampled_from"] = int(len(labels))
    if is_text:
        feats = np.asarray(store["features"][:], dtype=np.float32)
        c, t, d = feats.shape
        report["teacher_sanity"] = feature_report(feats.reshape(c * t, d), np.repeat(store.ids, t), k)
        report["templates"] = int(t)
    return report


def find_stores(path: Path) -> list[Path]:
    if (path / "zarr.json").exists():
        return [path]
    return [path / name for name in STORE_NAMES if (path / name / "zarr.json").exists()]


def show(report: dict) -> None:
    console.rule(f"[bold]{report['store']}")
    console.print(f"rows {report['rows']}, ok {report['ok']}, failed {report['failed']}; arrays: " +
                  ", ".join(f"{n} {a['dtype']}{a['shape']}" for n, a in report["arrays"].items()))
    if "counts" in report:
        splits = sorted({str(r["split"]) for r in report["counts"]})
        table = Table("category", *splits, title="ok / shapes per category and split")
        cells: dict[str, dict[str, str]] = {}
        for r in report["counts"]:
            cells.setdefault(str(r["category"]), {})[str(r["split"])] = f"{r['ok']}/{r['shapes']}"
        for category, by_split in sorted(cells.items()):
            table.add_row(category, *(by_split.get(s, "-") for s in splits))
        console.print(table)
    if report.get("failures"):
        table = Table("id", "stage", "error", "message", title="failures")
        for f in report["failures"]:
            table.add_row(f["id"], f["stage"], f["error"], f["message"][:80])
        console.print(table)
    if "teacher_sanity" in report:
        table = Table("statistic", "value", title="teacher sanity (cosine; kNN is leave-one-out)")
        for key, value in report["teacher_sanity"].items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console.print(table)
    console.print("provenance:", report["provenance"])


def run(path: Path, as_json: bool = False, parquet: Path | None = None, k: int = 5) -> list[dict]:
    stores = find_stores(path)
    if not stores:
        raise FileNotFoundError(f"no recon store at {path} (expected a .zarr store or a cache folder)")
    reports = [describe(s, k) for s in stores]
    if as_json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2, default=str))
    else:
        for report in reports:
            show(report)
    if parquet is not None:
        if len(stores) != 1:
            raise FileNotFoundError("--parquet exports one store: name it, not the cache folder")
        tmp = parquet.with_name(parquet.name + ".tmp")
        scan(stores[0]).sink_parquet(tmp)  # streamed a chunk at a time
        tmp.replace(parquet)
        console.print(f"exported {stores[0]} → {parquet}")
    return reports
