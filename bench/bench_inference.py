"""Benchmark: classifier inference, torch eager vs onnxruntime, side by side in one run.

For the tiny, small and base variants (depth 12, 64 groups x 32, 40 classes) at 1024 points:
exports the classifier to ONNX (grouping in the graph), checks the logits agree, then times
both on the same batch with the same thread count and prints shapes/s and the ratio.

    PYTHONPATH=. python bench/bench_inference.py [--batch 8] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recon.downstream.export import check_onnx, export_onnx, onnx_session
from recon.network.model import ReConClassifier, ReConConfig


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each function; the functions alternate so load drifts hit both alike."""
    for fn in fns:                            # warm-up (twice: allocator and kernel caches)
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="tiny,small,base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    points = np.random.default_rng(0).normal(size=(args.batch, args.points, 3)).astype(np.float32)
    points /= np.linalg.norm(points, axis=-1).max(axis=1)[:, None, None]
    x = torch.from_numpy(points)
    print(f"batch {args.batch} x {args.points} points, {args.classes} classes, {args.threads} thread(s), "
          f"best of {args.repeats}")
    print(f"{'variant':8} {'params':>8} {'torch shapes/s':>15} {'onnxruntime shapes/s':>21} {'ort / torch':>12} "
          f"{'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            torch.manual_seed(0)
            model = ReConClassifier(ReConConfig.variant(name), args.classes).eval()
            path = export_onnx(model, Path(tmp) / f"{name}.onnx", args.points)
            diff = check_onnx(path, model, points)
            session = onnx_session(path, args.threads)

            def run_torch(model: ReConClassifier = model) -> None:
                with torch.inference_mode():
                    model(x)

            def run_ort(session=session) -> None:
                session.run(None, {"points": points})

            t_torch, t_ort = best_times([run_torch, run_ort], args.repeats)
            n_params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"{name:8} {n_params:7.1f}M {args.batch / t_torch:15.1f} {args.batch / t_ort:21.1f} "
                  f"{t_torch / t_ort:11.2f}x {diff:11.2e}", flush=True)


if __name__ == "__main__":
    main()
