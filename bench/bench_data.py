"""Data-stage throughput: render and sample, at 1 and 2 worker processes, side by side.

    python bench/bench_data.py --per-category 24     # the demo's 12 categories × 24 = 288 shapes

Runs the real stages (`stages.render.run`, `stages.sample.run`) on demo meshes in a temporary
cache, each setting into a fresh store, and prints shapes/s and the 2-worker speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

from pipeline.demo import generate_demo  # noqa: E402
from stages import index, render, sample  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=24)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    results: dict[str, dict[int, float]] = {"render": {}, "sample": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["RECON_CACHE"] = str(tmp / "cache")
        n = len(generate_demo(tmp / "meshes", args.per_category))
        index.run(index.IndexParams(root=str(tmp / "meshes")))
        for workers in map(int, args.workers.split(",")):
            seconds = timed(lambda: render.run(render.RenderParams(workers=workers),
                                               out=tmp / "cache" / f"renders-{workers}.zarr"))
            results["render"][workers] = n / seconds
            seconds = timed(lambda: sample.run(sample.SampleParams(workers=workers),
                                               out=tmp / "cache" / f"points-{workers}.zarr"))
            results["sample"][workers] = n / seconds
    print(f"\n{n} demo shapes (224×224 one view; 8192 points), including process start-up")
    for stage, by_workers in results.items():
        line = ", ".join(f"{w} worker(s): {v:6.1f} shapes/s" for w, v in by_workers.items())
        counts = sorted(by_workers)
        ratio = (f" | {counts[-1]} vs {counts[0]} worker(s): {by_workers[counts[-1]] / by_workers[counts[0]]:.2f}x"
                 if len(counts) > 1 else "")
        print(f"{stage:>7}: {line}{ratio}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
