"""Pretraining throughput: cached teacher targets vs online teachers, side by side in one run.

(a) cached: the student reads its image/text targets from arrays (what `recon pretrain` does);
(b) online: every step augments each rendered view (random resized crop, flip, RandAugment,
    cutout) and runs the image teacher on it, and the text teacher on one prompt per shape, as
    the reference does, then the same student step.
With ``--real-data CACHE`` the online path is replaced by (c) real: the trainer's own loader
(``recon.pretraining.data.make_loader``: stores opened as ``recon pretrain`` opens them, ``--workers`` loader
processes, pinned memory) feeding the same student, next to (a), the synthetic ceiling on
device-resident random tensors; ``real / ceiling`` is what the input pipeline leaves of it.

Same student, same batch, same machine: both paths warm up, then alternate in blocks of
--steps (--rounds times), so that clock ramp-up and drift hit both alike; `--workers N` augments
the online path's images in N DataLoader worker processes overlapping the GPU work, as the
reference's loader does (they prefetch during cached blocks too, which if anything flatters the
online path). Also: peak memory of one training step per variant and batch, each in a fresh
subprocess (resident memory sampled every 5 ms on CPU, the allocator's peak on CUDA).

    python bench/bench_pretrain.py --variant base --batch 8 --steps 3 --rounds 2
    python bench/bench_pretrain.py --device cuda --bf16 --batch 128 --workers 8 --warmup 3 --rounds 3 --memory
    python bench/bench_pretrain.py --device cuda --bf16 --cuda-graph --batch 128 --real-data runs/bench_loader --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.augment import augment_view  # noqa: E402
from pipeline.prompts import templates  # noqa: E402
from pipeline.teachers import load_teacher  # noqa: E402
from recon.network.model import ReConConfig, ReConPretrain  # noqa: E402
from recon.runtime.cudagraph import GraphedForwardBackward  # noqa: E402
from recon.runtime.distributed import pick_device  # noqa: E402
from recon.runtime.optim import adamw  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def graphed_student(model, bf16: bool, compile_mode: str | None = None) -> GraphedForwardBackward:
    """The student's forward + backward (torch.compiled first, if asked) replayed as one CUDA
    graph, as `recon pretrain --cuda-graph [--compile]` does."""
    net = torch.compile(model, mode=compile_mode) if compile_mode else model

    def forward_loss(points, img, txt):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            loss = net(points, img, txt)["loss"]
        return loss, loss.detach()
    return GraphedForwardBackward(forward_loss, model)


def student_step(model, optimizer, points, img, txt, device, bf16) -> dict[str, float]:
    """Time one step. A graphed student's replay (forward + backward) counts as "forward" and
    the eager optimizer step as "backward"."""
    if isinstance(model, GraphedForwardBackward):
        t0 = now(device)
        model(points, img, txt)
        t1 = now(device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the graph keeps its gradient buffers
        return {"forward": t1 - t0, "backward": now(device) - t1}
    t0 = now(device)
    with autocast(device, bf16):
        out = model(points, img, txt)
    t1 = now(device)
    out["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t2 = now(device)
    return {"forward": t1 - t0, "backward": t2 - t1}


class AugmentedViews(torch.utils.data.Dataset):
    """The online path's image pipeline over `steps` batches: item i is image i (cycling through
    the pool) re-augmented with a per-(step, row) seed, so that a DataLoader's workers can do it in
    parallel, as the reference's loader does."""

    def __init__(self, images: np.ndarray, batch: int, steps: int) -> None:
        self.images, self.batch, self.steps = images, batch, steps

    def __len__(self) -> int:
        return self.batch * self.steps

    def __getitem__(self, i: int) -> np.ndarray:
        return augment_view(self.images[i % len(self.images)], seed=(i // self.batch) * 1000 + i % self.batch)


def online_batches(images: np.ndarray, batch: int, steps: int, workers: int):
    """Augmented uint8 image batches [batch, 224, 224, 3], one per step, in order."""
    views = AugmentedViews(images, batch, steps)
    if workers == 0:  # serial, in the training process
        for start in range(0, len(views), batch):
            yield np.stack([views[i] for i in range(start, start + batch)])
        return
    yield from torch.utils.data.DataLoader(views, batch_size=batch, num_workers=workers, collate_fn=stack_views,
                                           prefetch_factor=2, pin_memory=torch.cuda.is_available())


def stack_views(views: list[np.ndarray]) -> torch.Tensor:
    """A batch as one tensor, so that workers hand it over in shared memory (not pickled)."""
    return torch.from_numpy(np.stack(views))


def schedule(warmup: int, steps: int, rounds: int, other: str = "online") -> list[tuple[str, bool]]:
    """(path, timed) per step: both paths' warm-up steps first, then `rounds` alternating blocks
    of `steps` cached and `steps` other steps, so that clock ramp-up or drift hits both alike."""
    plan = [("cached", False)] * warmup + [(other, False)] * warmup
    for _ in range(rounds):
        plan += [("cached", True)] * steps + [(other, True)] * steps
    return plan


def real_batches(cache: Path, batch: int, workers: int, n_points: int, device: torch.device):
    """Batches from the trainer's own loader over a real cache, epoch after epoch (and the store
    dims): what `recon pretrain` feeds its student."""
    from recon.pretraining.data import EpochBatches, PretrainDataset, make_loader, open_pretrain_stores

    stores = open_pretrain_stores(cache, log=print)
    dataset = PretrainDataset(stores, n_points, seed=0)
    sampler = EpochBatches(dataset, batch, seed=0)
    loader = make_loader(dataset, sampler, workers, pin_memory=device.type == "cuda")

    def epochs():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    return epochs(), stores.image_dim, stores.text_dim


def bench_real(args) -> dict:
    """Samples/s of the student fed by the trainer's loader (real) and by device-resident random
    tensors (cached: the ceiling), alternating as :func:`schedule` orders them."""
    torch.manual_seed(0)
    device = pick_device(args.device)
    batches, image_dim, text_dim = real_batches(args.real_data, args.batch, args.workers, 1024, device)
    cfg = ReConConfig.variant(args.variant, img_feat_dim=image_dim, text_feat_dim=text_dim)
    model = ReConPretrain(cfg).to(device)
    optimizer = adamw(model, 0.05, 1e-4)
    student = (graphed_student(model, args.bf16, args.compile) if args.cuda_graph
               else torch.compile(model, mode=args.compile) if args.compile else model)
    pool = args.steps + args.warmup
    points = (torch.rand(args.batch * pool, 1024, 3) * 2 - 1).to(device)
    cached_img = torch.randn(args.batch * pool, image_dim, device=device)
    cached_txt = torch.randn(args.batch * pool, text_dim, device=device)
    parts = {m: {"data": 0.0, "forward": 0.0, "backward": 0.0} for m in ("cached", "real")}
    done = 0
    for mode, timed in schedule(args.warmup, args.steps, args.rounds, other="real"):
        t0 = now(device)
        if mode == "cached":
            rows = slice((done % pool) * args.batch, (done % pool + 1) * args.batch)
            done += 1
            x, img, txt = points[rows], cached_img[rows].clone(), cached_txt[rows].clone()
        else:  # as the trainer's loop does it: next batch, asynchronous copy from pinned memory
            b = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            x, img, txt = b["points"], b["img"], b["text"]
        t_data = now(device) - t0
        timing = student_step(student, optimizer, x, img, txt, device, args.bf16)
        if timed:
            parts[mode]["data"] += t_data
            for k, v in timing.items():
                parts[mode][k] += v
    n_timed = args.steps * args.rounds
    result = {mode: {"samples_per_s": args.batch * n_timed / sum(p.values()),
                     **{f"{k}_s_per_step": v / n_timed for k, v in p.items()}} for mode, p in parts.items()}
    result["real_over_ceiling"] = result["real"]["samples_per_s"] / result["cached"]["samples_per_s"]
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def bench(args) -> dict:
    """Samples/s and the time split of both paths (see :func:`schedule` for the order)."""
    torch.manual_seed(0)
    device = pick_device(args.device)
    image_teacher = load_teacher(args.image_teacher, "image", "random", device=str(device))
    text_teacher = load_teacher(args.text_teacher, "text", "random", device=str(device))
    for teacher in (image_teacher, text_teacher):
        teacher.precision = "bf16" if args.bf16 else "fp32"
    cfg = ReConConfig.variant(args.variant, img_feat_dim=image_teacher.dim, text_feat_dim=text_teacher.dim)
    model = ReConPretrain(cfg).to(device)
    optimizer = adamw(model, 0.05, 1e-4)  # as the trainer builds it
    if args.cuda_graph:
        if device.type != "cuda" or args.compile == "reduce-overhead":
            raise SystemExit("--cuda-graph needs --device cuda (and --compile default at most: it makes its own graph)")
        student = graphed_student(model, args.bf16, args.compile)
    else:
        student = torch.compile(model, mode=args.compile) if args.compile else model
    rng = np.random.default_rng(0)
    pool = args.steps + args.warmup                    # distinct batches of inputs, reused across rounds
    n_shapes = args.batch * pool
    images = rng.integers(0, 256, (n_shapes, 224, 224, 3), dtype=np.uint8)
    points = (torch.rand(n_shapes, 1024, 3) * 2 - 1).to(device)
    cached_img = torch.randn(n_shapes, image_teacher.dim, device=device)
    cached_txt = torch.randn(n_shapes, text_teacher.dim, device=device)
    prompts = [templates()[i % 60].format("chair") for i in range(n_shapes)]

    plan = schedule(args.warmup, args.steps, args.rounds)
    views = online_batches(images, args.batch, sum(m == "online" for m, _ in plan), args.workers)
    parts = {m: {"data": 0.0, "teacher": 0.0, "forward": 0.0, "backward": 0.0} for m in ("cached", "online")}
    done = {"cached": 0, "online": 0}
    for mode, timed in plan:
        rows = slice((done[mode] % pool) * args.batch, (done[mode] % pool + 1) * args.batch)
        done[mode] += 1
        t0 = now(device)
        if mode == "cached":
            img, txt = cached_img[rows].clone(), cached_txt[rows].clone()
            t_teacher = 0.0
            t_data = now(device) - t0
        else:  # the reference re-augments each image every step before its teacher sees it
            batch_images = next(views)
            t_data = now(device) - t0
            t1 = now(device)
            img = image_teacher.encode_images(batch_images, batch_size=args.batch).clone().to(device)
            txt = text_teacher.encode_texts(prompts[rows], batch_size=args.batch).clone().to(device)
            t_teacher = now(device) - t1
        timing = student_step(student, optimizer, points[rows], img, txt, device, args.bf16)
        if timed:
            parts[mode]["data"] += t_data
            parts[mode]["teacher"] += t_teacher
            for k, v in timing.items():
                parts[mode][k] += v
    result = {}
    n_timed = args.steps * args.rounds
    for mode, p in parts.items():
        result[mode] = {"samples_per_s": args.batch * n_timed / sum(p.values()),
                        **{f"{k}_s_per_step": v / n_timed for k, v in p.items()}}
    result["speedup_cached_over_online"] = result["cached"]["samples_per_s"] / result["online"]["samples_per_s"]
    compute = {m: sum(v for k, v in p.items() if k != "data") for m, p in parts.items()}
    result["speedup_without_data"] = compute["online"] / compute["cached"]
    return result


MEMORY_PROBE = """
import threading, time, psutil, torch
from recon.network.model import ReConConfig, ReConPretrain
torch.manual_seed(0)
device = torch.device({device!r})
model = ReConPretrain(ReConConfig.variant({variant!r})).to(device)
x = torch.rand({batch}, 1024, 3, device=device)
img, txt = torch.randn({batch}, 768, device=device), torch.randn({batch}, 512, device=device)
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled={bf16!r})
if device.type == "cuda":
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with autocast:
        loss = model(x, img, txt)["loss"]
    loss.backward()
    print(before, torch.cuda.max_memory_allocated(device))
else:
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak, running = [before], [True]
    def sample():
        while running[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)
    thread = threading.Thread(target=sample)
    thread.start()
    with autocast:
        loss = model(x, img, txt)["loss"]
    loss.backward()
    running[0] = False
    thread.join()
    print(before, peak[0])
"""


def peak_memory(variant: str, batch: int, device: torch.device, bf16: bool) -> tuple[float, float]:
    """(memory before the step, peak memory during one forward+backward) in GiB, in a fresh
    process: CUDA allocator peak on a GPU, resident memory sampled every 5 ms on CPU."""
    code = MEMORY_PROBE.format(variant=variant, batch=batch, device=str(device), bf16=bf16)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
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
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for student and teachers")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers augmenting the online path's images (0: in-process, serial)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile the student (both paths), mode default | reduce-overhead (CUDA graphs)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the student's forward + backward as one CUDA graph (both paths)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per path before the timed ones")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternating blocks of --steps cached and --steps online steps (3+ on a GPU)")
    parser.add_argument("--real-data", type=Path, metavar="CACHE",
                        help="compare the trainer's loader over this cache with the synthetic ceiling "
                             "(instead of the online teachers); --workers sets its loader processes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.real_data:
        main_real(args)
        return
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, {'bf16' if args.bf16 else 'fp32'}, variant {args.variant}, "
          f"batch {args.batch}, {args.rounds} x {args.steps} timed steps per path, teachers {args.image_teacher} + {args.text_teacher}, "
          f"{args.workers} augmentation workers{f', student compiled ({args.compile})' if args.compile else ''}"
          f"{', student forward + backward as one CUDA graph' if args.cuda_graph else ''}")
    result = {"throughput": bench(args)}
    for mode in ("cached", "online"):
        r = result["throughput"][mode]
        print(f"{mode:>7}: {r['samples_per_s']:7.2f} samples/s | per step: data {r['data_s_per_step']:.3f} s, "
              f"teacher {r['teacher_s_per_step']:.3f} s, forward {r['forward_s_per_step']:.3f} s, "
              f"backward {r['backward_s_per_step']:.3f} s")
    print(f"cached / online = {result['throughput']['speedup_cached_over_online']:.2f}x "
          f"({result['throughput']['speedup_without_data']:.2f}x counting teachers + student only, "
          f"as if image augmentation were free)")
    if args.memory:
        result["peak_memory_gib"] = {}
        for variant in ("tiny", "small", "base"):
            for batch in map(int, args.memory_batches.split(",")):
                before, peak = peak_memory(variant, batch, device, args.bf16)
                result["peak_memory_gib"][f"{variant}/b{batch}"] = {"before_step": before, "peak": peak,
                                                                      "step": peak - before}
                print(f"memory {variant:>5} batch {batch:>3}: peak {peak:.2f} GiB, "
                      f"{peak - before:.2f} GiB above the built model ({device.type}, one train step)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def main_real(args) -> None:
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, {'bf16' if args.bf16 else 'fp32'}, variant {args.variant}, "
          f"batch {args.batch}, {args.rounds} x {args.steps} timed steps per path, real data {args.real_data} "
          f"through {args.workers} loader workers{f', student compiled ({args.compile})' if args.compile else ''}"
          f"{', student forward + backward as one CUDA graph' if args.cuda_graph else ''}")
    result = bench_real(args)
    for mode, label in (("cached", "ceiling (device-resident random tensors)"), ("real", "real (the trainer's loader)")):
        r = result[mode]
        print(f"{label:>42}: {r['samples_per_s']:8.2f} samples/s | per step: data {r['data_s_per_step']:.4f} s, "
              f"forward {r['forward_s_per_step']:.4f} s, backward {r['backward_s_per_step']:.4f} s")
    if "peak_gpu_memory_gib" in result:
        print(f"peak GPU memory {result['peak_gpu_memory_gib']:.2f} GiB")
    print(f"real / ceiling = {result['real_over_ceiling']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"real_data": result}, indent=2))


if __name__ == "__main__":
    main()
