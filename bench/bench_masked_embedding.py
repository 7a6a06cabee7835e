"""One pretraining step of the student with the reference's patch embedding of every group
(`embed_masked: true`) against embedding only the visible groups (`embed_masked: false`), side
by side in one process: synthetic clouds and targets, no loader. Rounds alternate the two paths
so a busy machine slows both alike; the ratio uses each path's fastest round.

    python bench/bench_masked_embedding.py                      # the demo's student on CPU
    python bench/bench_masked_embedding.py --depth 12 --groups 64 --batch 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_pretrain import student_step  # noqa: E402  (this folder: the timed eager step)

from recon.network.model import ReConConfig, ReConPretrain  # noqa: E402
from recon.runtime.optim import adamw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    points = (torch.rand(args.batch, 1024, 3, generator=gen) * 2 - 1).to(device)
    img = torch.randn(args.batch, 1280, generator=gen).to(device)
    txt = torch.randn(args.batch, 384, generator=gen).to(device)

    def step_ms(embed_masked: bool) -> float:
        torch.manual_seed(0)
        cfg = ReConConfig.variant(args.variant, depth=args.depth, num_group=args.groups, img_feat_dim=1280,
                                  text_feat_dim=384, global_loss="cosine", proj_norm="batch",
                                  embed_masked=embed_masked)
        model = ReConPretrain(cfg).to(device).train()
        optimizer = adamw(model, 0.05, 1e-4)

        for _ in range(3):   # warm-up: allocator, kernels
            student_step(model, optimizer, points, img, txt, device, bf16=False)
        seconds = [sum(student_step(model, optimizer, points, img, txt, device, bf16=False).values())
                   for _ in range(args.steps)]
        return sum(seconds) / args.steps * 1e3

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for embed_masked in (True, False):
            times[embed_masked].append(step_ms(embed_masked))
    print(f"{args.variant}, depth {args.depth}, {args.groups} groups, batch {args.batch}, {device}, "
          f"{torch.get_num_threads()} threads; ms per step (forward + backward + AdamW), each round:")
    for embed_masked, label in ((True, "every group (the reference)"), (False, "visible groups only")):
        print(f"  {label:<28} " + "  ".join(f"{t:7.1f}" for t in times[embed_masked]))
    print(f"speed-up visible-only / every group: {min(times[True]) / min(times[False]):.2f}x")


if __name__ == "__main__":
    main()
