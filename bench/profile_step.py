"""Where one student training step spends GPU time: CUDA kernel time per op (torch.profiler on
eager steps), the kernel-time total against the wall time of an eager step and of a CUDA-graph
replay, and the grouping (FPS + kNN) on its own. Needs a CUDA device.

    python bench/profile_step.py --variant base --batch 128 --bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.network.model import ReConConfig, ReConPretrain
from recon.network.pointops import group_points
from recon.runtime.cudagraph import GraphedForwardBackward
from recon.runtime.optim import adamw


def cuda_ms(fn, repeat: int) -> float:
    """Mean wall milliseconds of fn() between CUDA events, after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="base")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compiled student replayed as a graph")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = ReConPretrain(ReConConfig.variant(args.variant)).to(dev).train()
    optimizer = adamw(model, 0.05, 1e-4)
    pts = torch.rand(args.batch, 1024, 3, device=dev) * 2 - 1
    img, txt = torch.randn(args.batch, 768, device=dev), torch.randn(args.batch, 512, device=dev)

    def forward_loss(p, i, t):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16, cache_enabled=False):
            loss = model(p, i, t)["loss"]
        return loss, loss.detach()

    def eager_step():
        loss, _ = forward_loss(pts, img, txt)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        eager_step()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            eager_step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: their aten ops' self device time counts the same kernels a second time
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
    print(f"{torch.cuda.get_device_name()}, {args.variant}, batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}")
    print(f"CUDA kernel time per eager step: {kernel_ms:.2f} ms")
    print(f"{'op (aten) or kernel':<60} {'ms/step':>8} {'calls/step':>10}")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
        if e.self_device_time_total > 0:
            print(f"{e.key[:60]:<60} {e.self_device_time_total / 1e3 / args.steps:8.3f} {e.count / args.steps:10.1f}")

    eager = cuda_ms(eager_step, args.steps)
    optimizer.zero_grad(set_to_none=True)
    graphed = GraphedForwardBackward(forward_loss, model)

    def graph_step():
        graphed(pts, img, txt)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    replay = cuda_ms(graph_step, args.steps)
    with torch.no_grad():
        grouping = cuda_ms(lambda: group_points(pts, model.cfg.num_group, model.cfg.group_size), args.steps)
    print(f"wall per step: eager {eager:.2f} ms, graph replay + optimizer {replay:.2f} ms; "
          f"grouping (FPS + kNN, eager) {grouping:.2f} ms")
    if args.compile:
        compiled = torch.compile(model)

        def compiled_loss(p, i, t):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16, cache_enabled=False):
                loss = compiled(p, i, t)["loss"]
            return loss, loss.detach()

        optimizer.zero_grad(set_to_none=True)
        graphed = GraphedForwardBackward(compiled_loss, model)
        print(f"wall per step: compiled + graph replay + optimizer {cuda_ms(graph_step, args.steps):.2f} ms")


if __name__ == "__main__":
    main()
