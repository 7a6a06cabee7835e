"""`recon show reconstruction CKPT`: input cloud, visible groups and reconstructed masked groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import layout
from pipeline.store import open_store
from recon.downstream.evaluate import load_pretrained
from recon.pretraining.data import fixed_subset
from stages.common import cache_dir, console


def reconstruction(checkpoint: Path, out: Path, n_shapes: int = 4, split: str = "test",
                   seed: int = 0, cache: Path | None = None, n_points: int = 1024) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache = cache or cache_dir()
    model = load_pretrained(checkpoint)
    table = pl.read_parquet(layout.CacheLayout(cache).shapes)
    store = open_store(layout.CacheLayout(cache).points, expect_ids=table["id"].to_list())
    candidates = [int(r) for r in np.flatnonzero(store.ok) if table["split"][int(r)] == split]
    if not candidates:
        raise FileNotFoundError(f"no usable {split} shapes in {cache}")
    first_of_category: dict[str, int] = {}  # one shape per category first, for variety
    for r in candidates:
        first_of_category.setdefault(table["category"][r], r)
    firsts = list(first_of_category.values())
    rows = (firsts + [r for r in candidates if r not in firsts])[:n_shapes]
    n_points = min(n_points, store["points"].shape[1])
    clouds = torch.from_numpy(np.stack([fixed_subset(store["points"][int(r)], n_points, seed) for r in rows]))
    generator = torch.Generator().manual_seed(seed)
    mask = model.random_mask(len(rows), "cpu", generator=generator)
    with torch.inference_mode():
        outputs = model(clouds, mask=mask)
    center, neighborhood = outputs["center"].numpy(), outputs["neighborhood"].numpy()
    mask_np = mask.numpy()
    masked = int(mask_np[0].sum())
    rebuilt = outputs["rebuild_points"].numpy().reshape(len(rows), masked, -1, 3)

    fig = plt.figure(figsize=(9, 3 * len(rows)))
    for i, row in enumerate(rows):
        visible = (neighborhood[i][~mask_np[i]] + center[i][~mask_np[i]][:, None]).reshape(-1, 3)
        predicted = (rebuilt[i] + center[i][mask_np[i]][:, None]).reshape(-1, 3)
        panels = [("input", clouds[i].numpy(), None),
                  ("visible groups", visible, None),
                  ("visible + reconstructed", visible, predicted)]
        for j, (title, points, extra) in enumerate(panels):
            ax = fig.add_subplot(len(rows), 3, 3 * i + j + 1, projection="3d")
            ax.scatter(points[:, 0], points[:, 2], points[:, 1], s=1, c="tab:blue")
            if extra is not None:
                ax.scatter(extra[:, 0], extra[:, 2], extra[:, 1], s=1, c="tab:red")
            ax.set_title(f"{table['category'][int(row)]}: {title}", fontsize=8)
            ax.set_axis_off()
            lim = 1.0
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_zlim(-lim, lim)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    console.print(f"reconstruction: {out} (red: reconstructed masked groups)")
    return out
