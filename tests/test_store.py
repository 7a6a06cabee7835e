"""The store layer: create, resume, finalise atomically, validate on read."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from conftest import ROOT, write_synthetic_cache
from pipeline.store import ArraySpec, StoreError, StoreWriter, open_store, partial_path, scan, to_polars

IDS = [f"s{i:02d}" for i in range(10)]
ARRAYS = {"x": ArraySpec((4, 3), "float32", chunk_rows=4)}


def _fill(writer: StoreWriter, max_blocks: int | None = None, fail: set[str] = frozenset()) -> None:
    for k, block in enumerate(writer.pending_blocks()):
        if max_blocks is not None and k >= max_blocks:
            return
        ok = np.array([IDS[r] not in fail for r in block])
        for r in block:
            if IDS[r] in fail:
                writer.record_failure(IDS[r], "test", "bad", "broken")
        writer.write_rows(block, {"x": np.stack([np.full((4, 3), r, np.float32) for r in block])}, ok)


def test_roundtrip_and_up_to_date(tmp_path):
    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, IDS, ARRAYS, {"k": 1}, {"who": "test"})
    _fill(writer)
    writer.finalise()
    assert not partial_path(path).exists()
    store = open_store(path, expect_ids=IDS, expect_params={"k": 1}, expect_arrays={"x": (4, 3)})
    assert store.ok.all() and store.provenance == {"who": "test"}
    np.testing.assert_array_equal(store["x"][7], np.full((4, 3), 7))
    assert StoreWriter.open(path, IDS, ARRAYS, {"k": 1}) is None  # nothing to do


def test_partial_store_reads_as_incomplete(tmp_path):
    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, IDS, ARRAYS, {"k": 1})
    _fill(writer, max_blocks=1)
    with pytest.raises(StoreError, match="partial store exists"):
        open_store(path)
    with pytest.raises(StoreError, match="not done"):
        writer.finalise()


def test_resume_continues_and_matches_uninterrupted(tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    writer = StoreWriter.open(a, IDS, ARRAYS, {"k": 1})
    _fill(writer, max_blocks=1, fail={"s01"})
    del writer  # "killed"
    resumed = StoreWriter.open(a, IDS, ARRAYS, {"k": 1})
    assert resumed.done_mask().sum() == 4
    assert [list(b) for b in resumed.pending_blocks()] == [[4, 5, 6, 7], [8, 9]]
    _fill(resumed, fail={"s01"})
    assert [f["id"] for f in resumed.failures()] == ["s01"]
    resumed.finalise()
    fresh = StoreWriter.open(b, IDS, ARRAYS, {"k": 1})
    _fill(fresh, fail={"s01"})
    fresh.finalise()
    sa, sb = open_store(a), open_store(b)
    np.testing.assert_array_equal(sa["x"][:], sb["x"][:])
    np.testing.assert_array_equal(sa.ok, sb.ok)
    assert not sa.ok[1]


def test_changed_params_discard_partial(tmp_path):
    path = tmp_path / "s.zarr"
    _fill(StoreWriter.open(path, IDS, ARRAYS, {"k": 1}), max_blocks=1)
    messages = []
    writer = StoreWriter.open(path, IDS, ARRAYS, {"k": 2}, log=messages.append)
    assert writer.done_mask().sum() == 0
    assert any("params changed" in m and "k" in m for m in messages)


def test_corrupt_done_chunk_counts_as_not_done(tmp_path):
    path = tmp_path / "s.zarr"
    _fill(StoreWriter.open(path, IDS, ARRAYS, {"k": 1}), max_blocks=2)
    chunk = partial_path(path) / "done" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:3])  # truncated by a crash
    writer = StoreWriter.open(path, IDS, ARRAYS, {"k": 1})
    np.testing.assert_array_equal(writer.done_mask(), [True] * 4 + [False] * 6)


def test_reader_refuses_mismatches(tmp_path):
    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, IDS, ARRAYS, {"k": 1})
    _fill(writer)
    writer.finalise()
    with pytest.raises(StoreError, match="misaligned.*row 0"):
        open_store(path, expect_ids=list(reversed(IDS)))
    with pytest.raises(StoreError, match="has 10 rows"):
        open_store(path, expect_ids=IDS[:5])
    with pytest.raises(StoreError, match="other params: k: expected 2, found 1"):
        open_store(path, expect_params={"k": 2})
    with pytest.raises(StoreError, match="rows of shape"):
        open_store(path, expect_arrays={"x": (5, 3)})
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "missing.zarr")


def test_to_polars(tmp_path):
    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, IDS, ARRAYS, {"k": 1})
    _fill(writer)
    writer.finalise()
    frame = to_polars(path)
    assert frame.columns == ["id", "ok", "x"] and frame.height == 10
    assert frame["x"].dtype.shape == (4, 3)
    assert frame["x"][3].to_numpy()[0, 0] == 3


CATS = ["a", "b", "c"]


def _feature_store(folder: Path, n: int = 37, chunk: int = 8) -> Path:
    """Several chunks (the last one partial), two failed rows, float16 features, and a shapes table
    in another order than the store that lacks the last shape. Chunk 0 holds category "a" only."""
    ids = [f"s{i:02d}" for i in range(n)]
    categories = ["a" if i < chunk else CATS[i % 3] for i in range(n)]
    features = np.random.default_rng(0).normal(size=(n, 2, 3, 4)).astype(np.float16)
    writer = StoreWriter.open(folder / "f.zarr", ids, {"features": ArraySpec((2, 3, 4), "float16", chunk)}, {})
    for block in writer.pending_blocks():
        writer.write_rows(block, {"features": features[block]}, ~np.isin(block, [3, 20]))
    writer.finalise()
    order = np.random.default_rng(1).permutation(n - 1)
    pl.DataFrame({"id": [ids[i] for i in order], "synset": "", "category": [categories[i] for i in order],
                  "split": ["test" if i % 5 == 0 else "train" for i in order]}).write_parquet(folder / "shapes.parquet")
    return folder / "f.zarr"


def _eager(path: Path) -> pl.DataFrame:
    """The reference: the whole store read at once with numpy, labels looked up per id."""
    store = open_store(path)
    table = {r["id"]: r for r in pl.read_parquet(path.parent / "shapes.parquet").to_dicts()}
    ids = [str(i) for i in store.ids]
    return pl.DataFrame({"id": ids, "category": [table.get(i, {}).get("category") for i in ids],
                         "split": [table.get(i, {}).get("split") for i in ids], "ok": store.ok,
                         "features": store["features"][:].astype(np.float32)},
                        schema_overrides={"category": pl.String, "split": pl.String})


QUERIES = {
    "all": lambda f: f,
    "ok rows of b": lambda f: f.filter(pl.col("ok") & (pl.col("category") == "b")).select("id", "features"),
    "filter on features": lambda f: f.filter(pl.col("features").arr.first().arr.first().arr.first() > 0).select("id"),
    "head": lambda f: f.head(11),
    "filter then head": lambda f: f.filter(pl.col("split") == "test").head(3),
    "count": lambda f: f.select(pl.len()),
    "per category": lambda f: f.group_by("category").agg(pl.len(), pl.col("ok").sum(),
                                                         pl.col("features").arr.last().arr.last().arr.last().mean())
                               .sort("category", nulls_last=True),
}


@pytest.mark.parametrize("engine", ["auto", "streaming"])
def test_scan_equals_an_eager_read(tmp_path, engine):
    path = _feature_store(tmp_path)
    expected = _eager(path)
    assert expected["category"].null_count() == 1 and expected.height == 37
    assert scan(path).collect_schema() == expected.schema
    assert_frame_equal(to_polars(path), expected)
    for name, query in QUERIES.items():
        try:
            assert_frame_equal(query(scan(path)).collect(engine=engine), query(expected.lazy()).collect())
        except AssertionError as err:
            raise AssertionError(f"query {name!r}: {err}") from err


def test_scan_decodes_only_what_a_query_needs(tmp_path):
    path = _feature_store(tmp_path)
    expected = _eager(path)
    chunk0 = path / "features" / "c" / "0" / "0" / "0" / "0"
    chunk0.write_bytes(b"not blosc")  # rows 0-7, all of category "a"
    with pytest.raises(RuntimeError, match="blosc"):
        scan(path).select("features").collect()  # the damage is seen when chunk 0 is decoded ...
    # ... so these queries never decoded it: no feature column, or a filter that rejects chunk 0 whole
    assert_frame_equal(scan(path).select("id", "category", "ok").collect(), expected.select("id", "category", "ok"))
    b_rows = scan(path).filter(pl.col("category") == "b").select("id", "features").collect()
    assert_frame_equal(b_rows, expected.filter(pl.col("category") == "b").select("id", "features"))


def test_scan_of_a_synthetic_cache_matches_the_stores(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache", n_per_class=3)
    image = scan(cache / "teachers" / "image.zarr").collect()
    assert image.columns == ["id", "category", "split", "ok", "features"]
    assert image["category"].to_list() == [c for c in ("ball", "box", "can") for _ in range(3)]
    np.testing.assert_array_equal(image["features"].to_numpy(),
                                  open_store(cache / "teachers" / "image.zarr")["features"][:].astype(np.float32))
    text = scan(cache / "teachers" / "text.zarr").collect()  # rows are categories: no shape labels
    assert text.columns == ["id", "ok", "features"] and text["id"].to_list() == ["ball", "box", "can"]


MEASURE = textwrap.dedent(r"""
    import json, re, sys
    import numpy as np, polars as pl
    from pipeline.store import scan, to_polars

    def rss(field):  # bytes; VmHWM is this process's peak (ru_maxrss would carry the parent's over exec)
        return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def row_mean(s):
        return pl.Series(s.to_numpy().reshape(len(s), -1).mean(1))

    def per_category(frame):  # streaming-capable: an elementwise UDF, then a group_by
        return (frame.filter(pl.col("ok"))
                .select("category", pl.col("features").map_batches(row_mean, return_dtype=pl.Float32,
                                                                   is_elementwise=True).alias("m"))
                .group_by("category").agg(pl.col("m").mean()).sort("category"))

    path, how = sys.argv[1], sys.argv[2]
    per_category(scan(path).head(3)).collect(engine="streaming")  # warm up imports and thread pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    before = rss("VmRSS")
    frame = scan(path) if how == "scan" else to_polars(path).lazy()
    result = per_category(frame).collect(engine="streaming")
    grown = rss("VmHWM") - before
    print(json.dumps({"grown": grown, "means": result["m"].to_list()}))
""")


def test_scan_streams_a_store_of_many_chunks_in_bounded_memory(tmp_path):
    """A per-category mean over a 200 MB (as float32) store of 128 chunks: the streamed scan grows
    the peak RSS by a fraction of it; materialising it (to_polars) by all of it."""
    n, row, chunk = 8192, (4, 2, 768), 64
    ids = [f"s{i:05d}" for i in range(n)]
    writer = StoreWriter.open(tmp_path / "big.zarr", ids, {"features": ArraySpec(row, "float16", chunk)}, {})
    for block in writer.pending_blocks():  # a chunk at a time: compressible rows, value = category + i / n
        values = (block % 3 + block / n).astype(np.float16)
        writer.write_rows(block, {"features": np.broadcast_to(values[:, None, None, None], (len(block), *row))},
                          np.ones(len(block), bool))
    writer.finalise()
    pl.DataFrame({"id": ids, "category": [CATS[i % 3] for i in range(n)], "split": "train"}).write_parquet(
        tmp_path / "shapes.parquet")
    full = n * int(np.prod(row)) * 4
    runs = {}
    for how in ("scan", "eager"):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big.zarr"), how], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        runs[how] = json.loads(out.stdout.splitlines()[-1])
    i = np.arange(n)
    values = (i % 3 + i / n).astype(np.float16).astype(np.float64)  # as stored
    expected = [values[i % 3 == c].mean() for c in range(3)]
    for how, run in runs.items():
        np.testing.assert_allclose(run["means"], expected, rtol=1e-5, err_msg=how)
    assert runs["eager"]["grown"] > 0.9 * full, (runs, full)  # the measurement sees a materialised store ...
    assert runs["scan"]["grown"] < full / 4, (runs, full)  # ... and the scan stays far below it


def test_inspect_streams_the_store_and_matches_an_eager_read(tmp_path):
    from pipeline.feature_stats import feature_report
    from stages import inspect

    cache = write_synthetic_cache(tmp_path / "cache", n_per_class=4, variants=2)
    path = cache / "teachers" / "image.zarr"
    store = open_store(path)
    categories = pl.read_parquet(cache / "shapes.parquet")["category"].to_numpy()  # same row order here
    eager = store["features"][:].astype(np.float32)[:, :, 0].mean(axis=1)  # clean variant, mean over views
    report = inspect.describe(path)
    assert report["teacher_sanity"] == feature_report(eager, categories)
    assert {(c["category"], c["split"]): c["shapes"] for c in report["counts"]} == {
        (c, s): n for c in ("ball", "box", "can") for s, n in (("test", 1), ("train", 3))}
    sampled = inspect.describe(path, max_items=5)["teacher_sanity"]
    assert sampled["items"] == 5 and sampled["sampled_from"] == 12
    inspect.run(path, as_json=True, parquet=tmp_path / "image.parquet")
    assert_frame_equal(pl.read_parquet(tmp_path / "image.parquet"), to_polars(path))


def _files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_two_shards_write_the_store_one_writer_writes(tmp_path, monkeypatch):
    import pipeline.store as S
    from pipeline.store import Shard
    single = StoreWriter.open(tmp_path / "one.zarr", IDS, ARRAYS, {"k": 1})
    _fill(single, fail={"s05"})
    single.finalise()
    path = tmp_path / "two.zarr"
    a = StoreWriter.open(path, IDS, ARRAYS, {"k": 1}, shard=Shard(0, 2))
    b = StoreWriter.open(path, IDS, ARRAYS, {"k": 1}, shard=Shard(1, 2))   # opens a's store
    assert [list(x) for x in a.pending_blocks()] == [[0, 1, 2, 3], [8, 9]]
    assert [list(x) for x in b.pending_blocks()] == [[4, 5, 6, 7]]
    _fill(a, fail={"s05"})
    assert not a.all_done()
    _fill(b, fail={"s05"})
    assert (partial_path(path) / "failures.rank1.jsonl").exists()
    assert a.all_done() and b.all_done()
    assert b.finalise() == path and a.finalise() is None   # exactly one finalises
    assert _files(path) == _files(tmp_path / "one.zarr")    # byte for byte, failure log included
    # a stale partial store is replaced by rank 0 only; another rank waits for it, then gives up
    StoreWriter.open(tmp_path / "s.zarr", IDS, ARRAYS, {"k": 1})
    monkeypatch.setattr(S, "SHARD_WAIT_S", 0.0)
    with pytest.raises(StoreError, match="rank 0 did not replace it"):
        StoreWriter.open(tmp_path / "s.zarr", IDS, ARRAYS, {"k": 2}, shard=Shard(1, 2))
    assert StoreWriter.open(tmp_path / "s.zarr", IDS, ARRAYS, {"k": 2}, shard=Shard(0, 2)).shard.rank == 0
    with pytest.raises(ValueError, match="RANK 2"):
        Shard(2, 2)
