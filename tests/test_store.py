"""The store layer: create, resume, finalise atomically, validate on read."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.store import (ArraySpec, StoreError, StoreWriter, open_store, partial_path,
                            to_polars)

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
