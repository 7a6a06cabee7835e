"""The pipeline on a real, labelled mesh corpus, measured stage by stage (not part of CI: the
corpus is fetched, never committed; academic-use data).

    # the corpus of issue #23: `fetch github:MaxRee94/ShapeDatabase_INFOMR` gives a bare git dir
    ./tools/env.sh python bench/real_meshes.py --snapshot /work/.mirror/MaxRee94+ShapeDatabase_INFOMR/repo \\
        --work /tmp/real                                      # 2,470 meshes, 69 classes (~20 min on 2 cores)
    ./tools/env.sh python bench/real_meshes.py --snapshot ... --per-class 2 --work /tmp/real-quick   # a quick try
    ./tools/env.sh python bench/real_meshes.py --folder /data/meshes --work /tmp/mine  # an extracted <class>/<mesh> folder

``--snapshot`` extracts the meshes (``<Class>/<id>.obj``) whose blobs the snapshot holds into
``<work>/meshes`` (files the snapshot lacks, such as its large ones, are counted and skipped; a PNG
and stats.txt beside the class folders are not meshes and are left out). Then index, render,
sample, embed, pretrain, convert (the held-out split as a classification store) and evaluate
(linear SVM, zero-shot, the random-init network under every BatchNorm treatment) run as the CLI
runs them, each in its own process, in ``<work>`` with its own params.yaml: settings for 2 CPU
cores (the demo's student and teachers; ``--epochs``, ``--views``). Per stage: wall time, shapes/s,
peak memory of its process tree, disk; per data stage the failures; at the end the headline
figures. Written to ``<work>/real_meshes.json`` and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_rehearsal import ROOT, run_stage  # noqa: E402  (one stage runner for both benchmarks)

MESH_SUFFIXES = (".obj", ".off", ".ply", ".stl")


def extract_snapshot(git_dir: Path, out: Path, per_class: int | None = None) -> dict:
    """Write every ``<Class>/<file>`` mesh of the snapshot's HEAD whose blob is present into ``out``
    (at most ``per_class`` a class, in name order); returns the counts."""
    listing = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    entries = []
    for line in listing:
        meta, path = line.split("\t", 1)
        parts = Path(path).parts
        if len(parts) == 2 and Path(path).suffix.lower() in MESH_SUFFIXES:
            entries.append((parts[0], path, meta.split()[2]))
    taken: dict[str, int] = {}
    written = absent = 0
    batch = subprocess.Popen(["git", "--git-dir", str(git_dir), "cat-file", "--batch"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    for cls, path, sha in sorted(entries):
        if per_class is not None and taken.get(cls, 0) >= per_class:
            continue
        batch.stdin.write(f"{sha}\n".encode())
        batch.stdin.flush()
        header = batch.stdout.readline().decode().split()
        if header[-1] == "missing":           # not in the snapshot (its largest files)
            absent += 1
            continue
        data = batch.stdout.read(int(header[2]))
        batch.stdout.read(1)                   # the newline after each object
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        taken[cls] = taken.get(cls, 0) + 1
        written += 1
    batch.stdin.close()
    batch.wait()
    return {"meshes": written, "absent_in_snapshot": absent, "classes": len(taken)}


def params_yaml(meshes: Path, epochs: int, views: int) -> str:
    """The demo's settings (student, teachers, monitor) on ``meshes``, sized for 2 CPU cores."""
    azimuths = [30.0 + 360.0 * k / views for k in range(views)]
    return (f"index: {{root: {meshes}, test_fraction: 0.2, seed: 0}}\n"
            f"render: {{views: {[[a, 20.0] for a in azimuths]}, workers: 2, chunk_rows: 8}}\n"
            "sample: {workers: 2, chunk_rows: 16}\n"
            "embed: {image_teacher: efficientnet_lite0, text_teacher: minilm, variants: 3, chunk_rows: 16}\n"
            f"pretrain: {{variant: tiny, model: {{proj_norm: batch, num_group: 32, depth: 6, embed_masked: false}},"
            f" epochs: {epochs}, batch_size: 8, lr: 0.00002, query_lr_scale: 25, schedule: step, warmup_epochs: 1,"
            " split: train, target_norm: store, global_loss: cosine, bn_recalibrate: 64, monitor_shapes: 512,"
            f" monitor_every: {max(epochs, 1)}, baseline_seeds: 3}}\n"
            "convert: {format: points, source: cache, out: cache/downstream/real.zarr, points: 2048}\n"
            "evaluate: {tasks: [svm, zeroshot], store: cache/downstream/real.zarr, baseline: true}\n")


def failures(work: Path) -> dict[str, int]:
    import polars as pl

    folder = work / "cache" / "failures"
    return {p.stem: pl.read_parquet(p).height for p in sorted(folder.glob("*.parquet"))} if folder.is_dir() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--snapshot", type=Path, help="a bare git dir of the corpus (what `fetch` gives)")
    source.add_argument("--folder", type=Path, help="an extracted <class>/<mesh> folder")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=None, help="at most N meshes a class (a quick try)")
    parser.add_argument("--epochs", type=int, default=10, help="pretraining epochs")
    parser.add_argument("--views", type=int, default=2, help="rendered views per shape")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.snapshot:
        meshes = work / "meshes"
        corpus = extract_snapshot(args.snapshot.resolve(), meshes, args.per_class)
        print(f"extracted {corpus['meshes']} meshes of {corpus['classes']} classes into {meshes} "
              f"({corpus['absent_in_snapshot']} absent from the snapshot)", flush=True)
    else:
        meshes, corpus = args.folder.resolve(), {"folder": str(args.folder)}
    (work / "params.yaml").write_text(params_yaml(meshes, args.epochs, args.views))
    cli = [sys.executable, "-c", "import sys; from cli import app; sys.argv = ['recon', *sys.argv[1:]]; app()"]
    plan = [("index", ["index"], ["cache/shapes.parquet"]), ("render", ["render"], ["cache/renders.zarr"]),
            ("sample", ["sample"], ["cache/points.zarr"]), ("embed", ["embed"], ["cache/teachers"]),
            ("pretrain", ["pretrain"], ["cache/pretrain"]), ("convert", ["convert"], ["cache/downstream"]),
            ("evaluate", ["evaluate"], ["cache/metrics/evaluate"])]
    import polars as pl

    results, shapes = [], 0
    for name, command, outputs in plan:
        results.append(run_stage(name, cli + command, work, outputs, shapes or 1))
        if name == "index":   # the rate of index too is per indexed shape
            shapes = pl.read_parquet(work / "cache" / "shapes.parquet").height
            results[-1]["shapes_per_s"] = shapes / results[-1]["wall_s"]
    headlines = {stage: json.loads((work / "cache" / "metrics" / stage / "metrics.json").read_text())
                 for stage in ("pretrain", "evaluate")}
    report = {"corpus": corpus, "shapes": shapes, "machine": f"{os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB", "epochs": args.epochs, "views": args.views,
              "stages": results, "failures": failures(work), "headlines": headlines,
              "total_s": sum(r["wall_s"] for r in results)}
    (work / "real_meshes.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"failures": report["failures"], "total_s": round(report["total_s"], 1), **headlines}, indent=2))


if __name__ == "__main__":
    if not (ROOT / "cli.py").exists():
        raise SystemExit("run from a clone of recon")
    main()
