"""`recon inspect`: what is in a store (or the whole cache), and whether the teachers make sense."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
from rich.table import Table

from pipeline.feature_stats import feature_report
from pipeline.store import open_store, to_polars
from stages.common import console

STORE_NAMES = ("renders.zarr", "points.zarr", "teachers/image.zarr", "teachers/text.zarr")


def _shapes_for(store_path: Path) -> pl.DataFrame | None:
    for folder in (store_path.parent, store_path.parent.parent):
        if (folder / "shapes.parquet").exists():
            return pl.read_parquet(folder / "shapes.parquet")
    return None


def describe(path: Path, k: int = 5) -> dict:
    """A JSON-able summary of one store: counts per category/split, failures, provenance, and
    teacher sanity statistics for feature stores."""
    store = open_store(path)
    report: dict = {"store": str(path), "rows": int(store.ids.size), "ok": int(store.ok.sum()),
                    "failed": int((~store.ok).sum()), "arrays": {
                        name: {"shape": list(store[name].shape), "dtype": str(store[name].dtype)}
                        for name in store.data_arrays()},
                    "params": store.params, "provenance": store.provenance}
    failures = path / "failures.jsonl"
    if failures.exists():
        report["failures"] = [json.loads(line) for line in failures.read_text().splitlines() if line.strip()]
    shapes = _shapes_for(path)
    is_text = store.rows_are_categories
    if shapes is not None and not is_text:
        table = pl.DataFrame({"id": store.ids, "ok": store.ok}).join(shapes, on="id", how="left")
        counts = table.group_by("category", "split").agg(pl.len().alias("shapes"), pl.col("ok").sum().alias("ok"))
        report["counts"] = counts.sort("category", "split").to_dicts()
        if "features" in store.data_arrays():
            feats = np.asarray(store["features"][:], dtype=np.float32)[store.ok]
            clean = feats[:, :, 0].mean(axis=1)  # variant 0 (clean) averaged over views
            labels = table.filter(pl.col("ok"))["category"].to_numpy()
            report["teacher_sanity"] = feature_report(clean, labels, k)
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
        to_polars(stores[0]).write_parquet(parquet)
        console.print(f"exported {stores[0]} → {parquet}")
    return reports
