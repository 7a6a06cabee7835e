"""The cost of ReCon++'s Hungarian matching of K image queries to V views, side by side in one run:
one pretraining step (forward + backward + AdamW) of the same student with K = V image queries and
all V views as targets, ``img_match: none`` (query k with view k: no matching) against
``img_match: hungarian`` (per shape, ``scipy.optimize.linear_sum_assignment`` on the detached
[K, V] loss matrix, one host transfer per step). Synthetic clouds and targets, no loader. The two
alternate step by step, so that a busy machine slows both alike; the ratio is the median of the
paired per-step ratios (and of each one's fastest step). On the CPU the process's CPU time per step
is reported beside the wall time (on a shared machine both stretch: torch's threads spin while they
wait); the matching alone, timed apart, is then the firmer figure. Also the matching alone (the [B, K, V]
loss matrix, then its transfer and the B assignments), which bounds the overhead from below.

    python bench/bench_matching.py                                  # base, batch 8, CPU
    python bench/bench_matching.py --device cuda --bf16 --batch 128  # the issue's setting
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.network import losses as L  # noqa: E402
from recon.network.model import ReConConfig, ReConPretrain  # noqa: E402
from recon.runtime.optim import adamw  # noqa: E402


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="base")
    parser.add_argument("--queries", type=int, default=12, help="K image queries = V views")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each, alternating")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of --steps")
    parser.add_argument("--image-dim", type=int, default=768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA), as the trainer runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    B, K = args.batch or (128 if device.type == "cuda" else 8), args.queries
    gen = torch.Generator().manual_seed(0)
    points = (torch.rand(B, 1024, 3, generator=gen) * 2 - 1).to(device)
    views = torch.randn(B, K, args.image_dim, generator=gen).to(device)
    text = torch.randn(B, 512, generator=gen).to(device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext

    students = {}
    for match in ("none", "hungarian"):
        torch.manual_seed(0)
        cfg = ReConConfig.variant(args.variant, img_queries=K, img_match=match, img_feat_dim=args.image_dim)
        model = ReConPretrain(cfg).to(device).train()
        students[match] = (model, adamw(model, 0.05, 1e-4))

    def step(match: str) -> None:
        model, optimizer = students[match]
        with amp():
            loss = model(points, views, text)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for match in students:   # warm-up: allocator, kernels
        for _ in range(2):
            step(match)
    times: dict[str, list[float]] = {m: [] for m in students}
    cpu: dict[str, list[float]] = {m: [] for m in students}
    for _ in range(args.rounds * args.steps):   # alternate step by step: load drift hits both alike
        for match in students:
            t0, c0 = now(device), time.process_time()
            step(match)
            times[match].append((now(device) - t0) * 1e3)
            cpu[match].append((time.process_time() - c0) * 1e3)

    # the matching alone, on the projected queries of one forward
    model = students["hungarian"][0]
    with torch.no_grad(), amp():
        pred = model.project_queries(model.encode(points))[0]
    parts = {"loss matrix": [], "transfer + assignments": []}
    for _ in range(10):
        t0 = now(device)
        cost = L.pair_losses(pred, views, "smooth_l1")
        t1 = now(device)
        L.hungarian_pairs(cost)
        t2 = now(device)
        parts["loss matrix"].append((t1 - t0) * 1e3)
        parts["transfer + assignments"].append((t2 - t1) * 1e3)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.variant}, K = V = {K}, batch {B}, {device} ({name}){', bf16' if args.bf16 else ''}; "
          f"ms per step (forward + backward + AdamW), step by step:")
    clocks = (("wall", times),) + ((("process CPU", cpu),) if device.type == "cpu" else ())
    for clock, values in clocks:
        for match, label in (("none", "match none (query k, view k)"), ("hungarian", "match hungarian")):
            print(f"  {clock:<11} {label:<30} " + "  ".join(f"{t:8.1f}" for t in values[match]))
    for clock, values in clocks:
        ratios = sorted(h / n for h, n in zip(values["hungarian"], values["none"]))
        fastest = min(values["hungarian"]) / min(values["none"])
        print(f"hungarian / none ({clock}): median of paired steps {ratios[len(ratios) // 2]:.3f}x, "
              f"fastest steps {fastest:.3f}x")
    print("the matching alone, ms (fastest of 10): " + ", ".join(f"{k} {min(v):.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
