"""Benchmark: batched torch point ops vs the naive per-cloud numpy loop.

Batch 32 x 1024 points, 64 groups x 32 (ReCon pretraining shapes). Prints the best time
of a few repeats for each side and the speed-up, after checking both sides agree.

    PYTHONPATH=. python bench/bench_pointops.py [--device cuda] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from recon.network import pointops as po


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()                                      # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--naive-repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 = same as the single-threaded numpy loop)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    B, N, G, S = args.batch, args.points, args.groups, args.group_size
    M = int(args.mask_ratio * G)
    gen = torch.Generator().manual_seed(0)
    xyz = torch.randn(B, N, 3, generator=gen)
    xyz = xyz / xyz.norm(dim=-1).amax(1).view(B, 1, 1)
    pred = torch.randn(B * M, S, 3, generator=gen) * 0.1
    target = torch.randn(B * M, S, 3, generator=gen) * 0.1
    xyz_d, pred_d, target_d = xyz.to(dev), pred.to(dev), target.to(dev)
    xyz_np, pred_np, target_np = xyz.numpy(), pred.numpy(), target.numpy()

    # correctness first
    idx = po.farthest_point_sample(xyz_d, G).cpu()
    assert all((idx[b].numpy() == po.fps_naive(xyz_np[b], G)).all() for b in range(B)), "FPS mismatch"
    centers = po.gather_points(xyz, idx)
    centers_d, centers_np = centers.to(dev), centers.numpy()
    kidx = po.knn(centers_d, xyz_d, S).cpu()
    agree = np.mean([set(a) == set(r) for b in range(B) for a, r in
                     zip(kidx[b].tolist(), po.knn_naive(centers_np[b], xyz_np[b], S).tolist())])
    cd = po.chamfer_l2(pred_d, target_d).item()
    cd_ref = po.chamfer_l2_naive(pred_np, target_np)
    assert abs(cd - cd_ref) <= 1e-5 * abs(cd_ref), (cd, cd_ref)

    rows = [
        ("FPS", lambda: po.farthest_point_sample(xyz_d, G),
         lambda: [po.fps_naive(xyz_np[b], G) for b in range(B)]),
        ("kNN", lambda: po.knn(centers_d, xyz_d, S),
         lambda: [po.knn_naive(centers_np[b], xyz_np[b], S) for b in range(B)]),
        ("group (FPS+kNN)", lambda: po.group_points(xyz_d, G, S),
         lambda: [po.group_points_naive(xyz_np[b], G, S) for b in range(B)]),
        (f"Chamfer-L2 ({B * M} pairs)", lambda: po.chamfer_l2(pred_d, target_d),
         lambda: po.chamfer_l2_naive(pred_np, target_np)),
    ]
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"B={B} N={N} G={G} S={S} M={M}")
    print(f"kNN set agreement with brute force: {agree:.4f}; Chamfer {cd:.6f} vs naive {cd_ref:.6f}")
    print(f"{'op':<26}{'vectorised ms':>15}{'naive loop ms':>15}{'speed-up':>10}")
    for name, fast, slow in rows:
        t_fast = best_time(fast, args.repeats, sync)
        t_slow = best_time(slow, args.naive_repeats, lambda: None)
        print(f"{name:<26}{t_fast * 1e3:>15.2f}{t_slow * 1e3:>15.2f}{t_slow / t_fast:>9.1f}x")


if __name__ == "__main__":
    main()
