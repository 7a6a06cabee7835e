"""Scale rehearsal: every stage at ShapeNet size on this machine, measured.

    python bench/scale_rehearsal.py --shapes 52500 --work runs/rehearsal     # ShapeNet size (~hours on 2 cores)
    python bench/scale_rehearsal.py --shapes 500 --work /tmp/r500             # a quick validation

The procedural demo generator writes ``--shapes`` meshes (12 categories, ShapeNetCore.v2 layout),
then demo-data, index, render, sample, embed and ``--steps`` pretraining steps run as the CLI runs
them (one process each, in ``--work`` with its own params.yaml and cache). Per stage: wall time,
shapes/s, peak memory of the stage's whole process tree (proportional set size, sampled every
0.2 s: pool workers and loader workers included, shared pages counted once), and the disk its
outputs take. Pretraining runs the trainer `recon pretrain` runs (real stores, real loader) with
its monitor (bounded by ``monitor_shapes``: 512 train + 512 test shapes whatever N is), plus the
train-split target statistics (streamed).
Results: a table on stdout and ``<work>/rehearsal.json``; rerun with another ``--shapes`` to see
which stages' memory grows with N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import layout  # noqa: E402

CATEGORIES = 12

PRETRAIN = """
import sys, time, json
from pathlib import Path
from recon.pretraining.trainer import PretrainParams, train
from recon.pretraining.targets import compute_target_stats
p = PretrainParams(variant="tiny", epochs=300, batch_size={batch}, warmup_epochs=10, device="cpu", max_steps={steps},
                   loader_workers={workers}, keep_last=1)
r = train(p, Path("cache"), Path("cache/pretrain"), log=print)
t = time.perf_counter()
s = r["stores"]
b = compute_target_stats(s.image, s.text, s.category_index, s.rows).summary()  # streamed over the (memory-mapped) store
print("REHEARSAL " + json.dumps({{"samples_per_s": r["history"][-1]["samples_per_s"], "data_s": r["history"][-1]["data_s"],
                                  "target_stats_s": time.perf_counter() - t, **b}}))
"""


def tree_memory(proc: psutil.Process) -> int:
    """Proportional set size summed over the process tree: pages a forked loader worker shares
    with its parent count once, not twice as RSS would count them."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def du(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


def run_stage(name: str, cmd: list[str], work: Path, outputs: list[Path], shapes: int, cache: str = "cache") -> dict:
    """One stage in its own process (its stores in ``work/cache``): wall time, peak tree RSS, disk of its outputs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RECON_CACHE": cache, "RECON_PARAMS": "params.yaml",
           "HF_HUB_OFFLINE": "1", "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "egl")}
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_memory(proc))
            stop.wait(0.2)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    output = proc.communicate()[0]
    stop.set()
    watcher.join()
    wall = time.perf_counter() - t0
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{name}.log").write_text(output)
    if proc.returncode != 0:
        print(output[-3000:])
        raise SystemExit(f"{name} failed ({proc.returncode})")
    result = {"stage": name, "wall_s": wall, "shapes_per_s": shapes / wall, "peak_pss_gib": peak[0] / 2**30,
              "disk_gib": du([work / o for o in outputs]) / 2**30}
    extra = next((json.loads(l[len("REHEARSAL "):]) for l in output.splitlines() if l.startswith("REHEARSAL ")), None)
    if extra:
        result.update(extra)
    print(f"{name:>9}: {wall:8.1f} s, {result['shapes_per_s']:8.1f} shapes/s, peak PSS {result['peak_pss_gib']:.2f} GiB, "
          f"disk {result['disk_gib']:.3f} GiB" + (f" | {extra}" if extra else ""), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=52_500)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "rehearsal")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="render/sample process pools")
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--precision", default="bf16", help="embed precision (bf16: 2-3x faster on AMX CPUs)")
    parser.add_argument("--stages", default="demo-data,index,render,sample,embed,pretrain")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    per_category = -(-args.shapes // CATEGORIES)
    n = per_category * CATEGORIES
    (work / "params.yaml").write_text(
        f"demo: {{out: cache/demo_meshes, shapes_per_category: {per_category}}}\n"
        "index: {root: cache/demo_meshes}\n"
        f"render: {{workers: {args.workers}, chunk_rows: 8}}\n"
        f"sample: {{workers: {args.workers}, chunk_rows: 16}}\n"
        f"embed: {{precision: {args.precision}, chunk_rows: 16, batch_size: 64}}\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; {n} shapes in {work}", flush=True)
    cli = [sys.executable, "-c", "import sys; from cli import app; sys.argv = ['recon', *sys.argv[1:]]; app()"]
    at = layout.default
    plan = {"demo-data": (cli + ["demo-data"], [at(layout.DEMO_MESHES)]),
            "index": (cli + ["index"], [at(layout.SHAPES)]),
            "render": (cli + ["render"], [at(layout.RENDERS), at(layout.RENDERS_PREVIEW)]),
            "sample": (cli + ["sample"], [at(layout.POINTS)]),
            "embed": (cli + ["embed"], [at(layout.TEACHERS)]),
            "pretrain": ([sys.executable, "-c", PRETRAIN.format(batch=args.batch, steps=args.steps,
                                                                 workers=args.loader_workers)],
                         ["cache/pretrain", "cache/local"])}
    results = [run_stage(name, plan[name][0], work, plan[name][1], n) for name in args.stages.split(",")]
    report = {"shapes": n, "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
              "stages": results}
    (work / "rehearsal.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
