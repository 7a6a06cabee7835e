"""Loader-only throughput of pretraining: the trainer's own DataLoader (``recon.pretraining.data.make_loader``)
over a ShapeNet-sized cache, by worker count, with no student.

    python bench/bench_loader.py                                  # 52,470 shapes × 8192 points
    python bench/bench_loader.py --shapes 4096 --workers 0,1,2    # a quick try

The cache (shapes.parquet, points.zarr, teachers/{image,text}.zarr, synthetic content of the real
shapes and dtypes) is generated into ``--cache`` when absent and reused afterwards. Opening it
goes through ``open_pretrain_stores`` as training does (preload within the RAM budget, else one
decompression into a memory-mapped local copy, timed). Then, per worker count, a few warm-up
batches and ``--batches`` timed ones: wall-clock samples/s, and samples per CPU-second of the
main process plus its workers (the per-core rate, which says how the loader scales with cores).
The last line is ``loader samples/s: <X> at <W> workers`` for the best worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.layout import CacheLayout  # noqa: E402
from recon.pretraining.data import EpochBatches, PretrainDataset, make_loader, open_pretrain_stores  # noqa: E402

SHAPENET_SHAPES = 52_470
SHAPENET_CATEGORIES = 55


def generate_cache(cache: Path, shapes: int, points: int, views: int, variants: int, image_dim: int,
                   text_dim: int, templates: int = 60, block: int = 1024, chunk_rows: int = 16,
                   threads: int | None = None) -> None:
    """A pretraining cache of ``shapes`` shapes with the real stores' layout, dtypes and chunking:
    clouds on random ellipsoids (they compress like surface samples), random teacher features.
    Blocks of ``block`` rows are generated and written by ``threads`` threads (numpy's generators
    and the compressor release the GIL); block ``b`` is seeded by ``b``, so the content does not
    depend on the thread count."""
    from concurrent.futures import ThreadPoolExecutor

    import polars as pl

    from pipeline.store import ArraySpec, StoreWriter

    categories = [f"c{i:02d}" for i in range(SHAPENET_CATEGORIES)]
    ids = [f"{i:08d}" for i in range(shapes)]
    cats = [categories[i % len(categories)] for i in range(shapes)]
    cache.mkdir(parents=True, exist_ok=True)

    def write(path, rows, name, spec, make):
        writer = StoreWriter.open(path, rows, {name: spec}, {"bench": True})
        if writer is None:
            return

        def one(lo):  # whole chunks at a time, flags after data as the stages write them
            hi = min(lo + block, len(rows))
            writer.group[name][lo:hi] = make(np.random.default_rng([lo, len(rows)]), hi - lo)
            writer.group["ok"][lo:hi] = True
            writer.group["done"][lo:hi] = True

        with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
            list(pool.map(one, range(0, len(rows), block)))
        writer.finalise()

    def clouds(rng, n):
        x = rng.standard_normal((n, points, 3), dtype=np.float32)
        x /= np.linalg.norm(x, axis=2, keepdims=True)
        x *= rng.uniform(0.3, 1.0, (n, 1, 3)).astype(np.float32)
        return x

    t0 = time.perf_counter()
    where = CacheLayout(cache)
    write(where.points, ids, "points", ArraySpec((points, 3), "float32", chunk_rows), clouds)
    write(where.image_features, ids, "features",
          ArraySpec((views, variants, image_dim), "float16", chunk_rows),
          lambda rng, n: rng.standard_normal((n, views, variants, image_dim), dtype=np.float32).astype(np.float16))
    write(where.text_features, categories, "features",
          ArraySpec((templates, text_dim), "float16", len(categories)),
          lambda rng, n: rng.standard_normal((n, templates, text_dim), dtype=np.float32).astype(np.float16))
    pl.DataFrame({"id": ids, "synset": [""] * shapes, "category": cats, "split": ["train"] * shapes,
                  "mesh_path": [""] * shapes, "status": ["indexed"] * shapes}).write_parquet(where.shapes)
    print(f"generated {shapes} shapes into {cache} in {time.perf_counter() - t0:.0f} s")


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of this process and its live children (the loader's workers)."""
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def measure(dataset: PretrainDataset, batch: int, workers: int, batches: int, warmup: int,
            device: torch.device) -> dict:
    sampler = EpochBatches(dataset, batch, seed=0)
    loader = make_loader(dataset, sampler, workers, pin_memory=device.type == "cuda")
    proc = psutil.Process()

    def epochs():  # as many epochs as the timed batches need, as training runs them
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = epochs()
    for _ in range(warmup):  # worker start-up and the first prefetch are not the steady state
        next(it)
    t0, c0 = time.perf_counter(), cpu_seconds(proc)
    for _ in range(batches):
        b = next(it)
        if device.type == "cuda":  # as the trainer moves them
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(proc) - c0
    it.close()
    del it, loader
    n = batches * batch
    return {"workers": workers, "samples_per_s": n / wall, "samples_per_cpu_s": n / max(cpu, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_loader"))
    parser.add_argument("--shapes", type=int, default=SHAPENET_SHAPES)
    parser.add_argument("--points", type=int, default=8192)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--variants", type=int, default=10)
    parser.add_argument("--image-dim", type=int, default=768)
    parser.add_argument("--text-dim", type=int, default=512)
    parser.add_argument("--n-points", type=int, default=1024, help="points per training sample")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=60, help="timed batches per worker count")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--device", default="cpu", help="cuda: also copy each batch to the GPU, as training does")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}")
    if not CacheLayout(args.cache).shapes.exists():
        generate_cache(args.cache, args.shapes, args.points, args.views, args.variants, args.image_dim, args.text_dim)
    t0 = time.perf_counter()
    stores = open_pretrain_stores(args.cache, log=print)
    opened = time.perf_counter() - t0
    print(f"opened {len(stores.rows)} shapes in {opened:.1f} s (points {stores.points.shape}, "
          f"image {stores.image.shape}, text {stores.text.shape})")
    dataset = PretrainDataset(stores, args.n_points, seed=0)
    device = torch.device(args.device)
    results = []
    for workers in map(int, args.workers.split(",")):
        r = measure(dataset, args.batch, workers, args.batches, args.warmup, device)
        results.append(r)
        print(f"{workers} workers: {r['samples_per_s']:8.0f} samples/s, {r['samples_per_cpu_s']:7.0f} samples "
              f"per CPU-second (main + workers)")
    per_core = max(r["samples_per_cpu_s"] for r in results)
    print(f"per core: {per_core:.0f} samples/s; a loader with W workers needs about W + 1 cores and gives at most "
          f"W × {per_core:.0f} samples/s (16 cores, 4 workers: ≈ {4 * per_core:.0f}, memory bandwidth permitting)")
    if args.out:
        args.out.write_text(json.dumps({"opened_s": opened, "shapes": len(stores.rows), "results": results}, indent=2))
    best = max(results, key=lambda r: r["samples_per_s"])
    print(f"loader samples/s: {best['samples_per_s']:.0f} at {best['workers']} workers")


if __name__ == "__main__":
    main()
