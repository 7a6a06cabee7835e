"""Pretraining throughput: cached teacher targets vs online teachers, side by side in one run.

(a) cached: the student reads its image/text targets from arrays (what `recon pretrain` does);
(b) online: every step augments each rendered view (random resized crop, flip, RandAugment,
    cutout) and runs the image teacher on it, and the text teacher on one prompt per shape, as
    the reference does, then the same student step.
Same student, same batch, same machine, interleaved. Also: peak memory of one training step
per variant and batch (each in a fresh subprocess, ru_maxrss).

    python bench/bench_pretrain.py --variant base --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.augment import augment_view  # noqa: E402
from pipeline.prompts import templates  # noqa: E402
from pipeline.teachers import load_teacher  # noqa: E402
from recon.model import ReConConfig, ReConPretrain  # noqa: E402
from recon.optim import adamw  # noqa: E402


def student_step(model, optimizer, points, img, txt) -> dict[str, float]:
    t0 = time.perf_counter()
    out = model(points, img, txt)
    t1 = time.perf_counter()
    out["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1}


def bench(args) -> dict:
    torch.manual_seed(0)
    image_teacher = load_teacher(args.image_teacher, "image", "random")
    text_teacher = load_teacher(args.text_teacher, "text", "random")
    cfg = ReConConfig.variant(args.variant, img_feat_dim=image_teacher.dim, text_feat_dim=text_teacher.dim)
    model = ReConPretrain(cfg)
    optimizer = adamw(model, 0.05, 1e-4)  # as the trainer builds it
    rng = np.random.default_rng(0)
    n_shapes = args.batch * (args.steps + 1)
    images = rng.integers(0, 256, (n_shapes, 224, 224, 3), dtype=np.uint8)
    points = torch.rand(n_shapes, 1024, 3) * 2 - 1
    cached_img = torch.randn(n_shapes, image_teacher.dim)
    cached_txt = torch.randn(n_shapes, text_teacher.dim)
    prompts = [templates()[i % 60].format("chair") for i in range(n_shapes)]

    totals = {mode: {"data": 0.0, "teacher": 0.0, "forward": 0.0, "backward": 0.0} for mode in ("cached", "online")}
    for step in range(args.steps + 1):  # step 0 warms up, not counted
        rows = slice(step * args.batch, (step + 1) * args.batch)
        for mode in ("cached", "online"):
            t0 = time.perf_counter()
            if mode == "cached":
                img, txt = cached_img[rows].clone(), cached_txt[rows].clone()
                t_teacher = 0.0
                t_data = time.perf_counter() - t0
            else:  # the reference re-augments each image every step before its teacher sees it
                batch_images = np.stack([augment_view(im, seed=step * 1000 + i)
                                         for i, im in enumerate(images[rows])])
                t_data = time.perf_counter() - t0
                t1 = time.perf_counter()
                img = image_teacher.encode_images(batch_images).clone()  # out of inference mode
                txt = text_teacher.encode_texts(prompts[rows]).clone()
                t_teacher = time.perf_counter() - t1
            timing = student_step(model, optimizer, points[rows], img, txt)
            if step:
                totals[mode]["data"] += t_data
                totals[mode]["teacher"] += t_teacher
                for k, v in timing.items():
                    totals[mode][k] += v
    result = {}
    for mode, parts in totals.items():
        seconds = sum(parts.values())
        result[mode] = {"samples_per_s": args.batch * args.steps / seconds,
                        **{f"{k}_s_per_step": v / args.steps for k, v in parts.items()}}
    result["speedup_cached_over_online"] = result["cached"]["samples_per_s"] / result["online"]["samples_per_s"]
    return result


MEMORY_PROBE = """
import threading, time, psutil, torch
from recon.model import ReConConfig, ReConPretrain
torch.manual_seed(0)
model = ReConPretrain(ReConConfig.variant({variant!r}))
x, img, txt = torch.rand({batch}, 1024, 3), torch.randn({batch}, 768), torch.randn({batch}, 512)
proc = psutil.Process()
before = proc.memory_info().rss
peak, running = [before], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
thread = threading.Thread(target=sample)
thread.start()
model(x, img, txt)["loss"].backward()
running[0] = False
thread.join()
print(before, peak[0])
"""


def peak_memory(variant: str, batch: int) -> tuple[float, float]:
    """(resident memory before the step, peak resident memory during one forward+backward) in
    GiB, sampled every 5 ms in a fresh process."""
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(variant=variant, batch=batch)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    before, peak = map(int, result.stdout.split()[-2:])
    return before / 2**30, peak / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-teacher", default="timm:vit_base_patch16_224")
    parser.add_argument("--text-teacher", default="open_clip:ViT-B-32")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per variant/batch")
    parser.add_argument("--memory-batches", default="32,128")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, variant {args.variant}, "
          f"batch {args.batch}, {args.steps} timed steps, teachers {args.image_teacher} + {args.text_teacher}")
    result = {"throughput": bench(args)}
    for mode in ("cached", "online"):
        r = result["throughput"][mode]
        print(f"{mode:>7}: {r['samples_per_s']:7.2f} samples/s | per step: data {r['data_s_per_step']:.3f} s, "
              f"teacher {r['teacher_s_per_step']:.3f} s, forward {r['forward_s_per_step']:.3f} s, "
              f"backward {r['backward_s_per_step']:.3f} s")
    print(f"cached / online = {result['throughput']['speedup_cached_over_online']:.2f}x")
    if args.memory:
        result["peak_memory_gib"] = {}
        for variant in ("tiny", "small", "base"):
            for batch in map(int, args.memory_batches.split(",")):
                before, peak = peak_memory(variant, batch)
                result["peak_memory_gib"][f"{variant}/b{batch}"] = {"before_step": before, "peak": peak,
                                                                      "step": peak - before}
                print(f"memory {variant:>5} batch {batch:>3}: peak {peak:.2f} GiB resident, "
                      f"{peak - before:.2f} GiB above the built model (CPU, one train step)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
