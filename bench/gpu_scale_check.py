"""The ShapeNet-scale GPU check: real samples/s of `recon pretrain`'s trainer through its own
loader on a ShapeNet-sized cache, next to the student's ceiling, with peak GPU memory.

    python3 bench/gpu_scale_check.py                 # base, batch 128, bf16, --cuda-graph
    COMPILE=1 python3 bench/gpu_scale_check.py       # also torch.compile the student (+~2 min x 2)
    python bench/gpu_scale_check.py --device cpu --variant tiny --batch 16 --shapes 600 --steps 8 --skip 2
                                                     # a dry run of the plumbing on a CPU

Most important first, each part in its own process with its own time limit (the whole check
fits 8 minutes on an H100/H200 without COMPILE):
1. a ShapeNet-sized cache (52,470 shapes × 8192 points, 10 image variants; bench_loader.py's
   generator), unless already there;
2. `recon.pretraining.trainer.train` (what `recon pretrain` runs: stores opened, preloaded or memory-mapped,
   the real DataLoader with the default `loader_workers: auto`, bf16, CUDA graph) for --steps
   optimiser steps; samples/s timed per step after --skip warm-up steps, peak GPU memory;
3. `bench_pretrain.py --real-data`: the synthetic ceiling (device-resident random tensors) and
   the same student fed by the trainer's loader, alternating, ratio printed;
4. `bench_loader.py`: loader alone by worker count.
Results: $OUT (default /tmp/gpu_scale_check)/scale_check.json and the log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.layout import CacheLayout  # noqa: E402


class StepClock:
    """A progress 'bar' for `train`: records when each optimiser step ends."""

    stamps: list[float] = []

    def __init__(self, title: str, total: int):
        pass

    def update(self, **losses: float) -> None:
        StepClock.stamps.append(time.perf_counter())

    def close(self) -> None:
        pass


def train_part(args, out: Path, compile_student: bool) -> dict:
    """Part 2, in this process: the trainer for `steps` steps; steady-state samples/s."""
    import shutil

    import torch

    from recon.pretraining.trainer import PretrainParams, train

    cuda = args.device == "cuda"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume
    p = PretrainParams(variant=args.variant, epochs=300, batch_size=args.batch, warmup_epochs=10, device=args.device,
                       cuda_graph=cuda, compile=compile_student, loader_workers="auto", max_steps=args.steps, keep_last=1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(p, args.cache, out, progress_factory=StepClock, log=print)
    stamps = StepClock.stamps
    timed = len(stamps) - 1 - args.skip
    return {"steps": len(stamps), "wall_s": time.perf_counter() - t0,
            "samples_per_s": args.batch * timed / (stamps[-1] - stamps[args.skip]),
            "epoch_record": result["history"][-1],
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "gpu": torch.cuda.get_device_name() if cuda else "CPU"}


def run(cmd: list[str], limit: int) -> str:
    print("$", " ".join(cmd), flush=True)
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        print(done.stdout[-4000:], done.stderr[-2000:] if done.returncode else "", flush=True)
        return done.stdout
    except subprocess.TimeoutExpired as err:
        print(f"timed out after {limit} s", (err.stdout or b"")[-2000:], flush=True)
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench_loader")
    parser.add_argument("--shapes", type=int, default=52_470)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=20, help="steps not timed (capture, warm-up)")
    parser.add_argument("--part", choices=["all", "train"], default="all")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variant", default="base")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/gpu_scale_check"))
    out.mkdir(parents=True, exist_ok=True)
    compile_student = os.environ.get("COMPILE", "0") == "1"
    if args.part == "train":  # the child process of part 2
        print("TRAIN_RESULT " + json.dumps(train_part(args, out / "pretrain", compile_student)))
        return
    t0 = time.perf_counter()
    summary: dict = {}
    if not CacheLayout(args.cache).shapes.exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_loader import generate_cache
        generate_cache(args.cache, args.shapes, 8192, 1, 10, 768, 512)
    summary["generate_s"] = time.perf_counter() - t0
    common = ["--device", args.device, "--variant", args.variant, "--batch", str(args.batch)]
    lines = run([sys.executable, __file__, "--part", "train", "--cache", str(args.cache), "--steps", str(args.steps),
                 "--skip", str(args.skip), *common], 420 if compile_student else 180)
    trained = next((json.loads(l[len("TRAIN_RESULT "):]) for l in lines.splitlines() if l.startswith("TRAIN_RESULT ")), None)
    summary["trainer"] = trained
    flags = (["--bf16", "--cuda-graph"] if args.device == "cuda" else []) + (["--compile"] if compile_student else [])
    workers = "4" if args.device == "cuda" else "1"
    steps = "20" if args.device == "cuda" else "2"
    run([sys.executable, "bench/bench_pretrain.py", *common, "--steps", steps, "--warmup", "3", "--rounds", "3",
         "--real-data", str(args.cache),
                 "--workers", workers, *flags, "--out", str(out / "real_vs_ceiling.json")], 420 if compile_student else 150)
    if (out / "real_vs_ceiling.json").exists():
        summary["bench"] = json.loads((out / "real_vs_ceiling.json").read_text())["real_data"]
    loader = run([sys.executable, "bench/bench_loader.py", "--cache", str(args.cache), "--batch", str(args.batch),
                  "--workers", "0,1,2,4,8" if args.device == "cuda" else "0,1", "--batches", "40",
                  "--device", args.device, "--out", str(out / "loader.json")], 150)
    summary["loader_last_line"] = (loader.strip().splitlines() or [""])[-1]
    summary["total_s"] = time.perf_counter() - t0
    (out / "scale_check.json").write_text(json.dumps(summary, indent=2))
    print("\n== summary")
    if trained:
        mode = "bf16, cuda graph" if args.device == "cuda" else "fp32"
        print(f"{trained['gpu']}: recon pretrain ({args.variant}, batch {args.batch}, {mode}"
              f"{', compiled' if compile_student else ''}, "
              f"{args.shapes} shapes, loader_workers auto): {trained['samples_per_s']:.0f} samples/s over steps "
              f"{args.skip}-{trained['steps']}, peak GPU memory {trained['peak_gpu_memory_gib'] or 0:.2f} GiB, "
              f"data wait {trained['epoch_record'].get('data_s', 0):.2f} s of {trained['epoch_record'].get('epoch_s', 0):.1f} s")
    if "bench" in summary:
        b = summary["bench"]
        print(f"student ceiling (device-resident random tensors): {b['cached']['samples_per_s']:.0f} samples/s; "
              f"fed by the trainer's loader ({workers} workers): {b['real']['samples_per_s']:.0f}; "
              f"real / ceiling = {b['real_over_ceiling']:.3f}")
        if trained:
            print(f"recon pretrain / ceiling = {trained['samples_per_s'] / b['cached']['samples_per_s']:.3f}")
    print(summary["loader_last_line"])
    print(f"total {summary['total_s']:.0f} s")


if __name__ == "__main__":
    main()
