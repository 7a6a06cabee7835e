"""The ReCon pretraining loop: the student against cached teacher targets.

One readable loop: AdamW with the reference parameter groups (the distillation side, ``QUERY_SIDE``,
at ``query_lr_scale`` × lr), warm-up + cosine schedule per epoch (the reference) or per step,
gradient accumulation up to the global batch, bf16 autocast on CUDA, optional torch.compile and/or
CUDA-graph replay of forward + backward (one GPU), DDP under torchrun, an atomic checkpoint every
epoch, exact resume, a non-finite-loss guard. ReCon++ options (docs/reconpp.md): K image queries
matched to all V cached views (``model.img_queries``, ``match``), a reconstruction-only first stage
(``rec_epochs``) and the encoder blocks initialised from a timm ViT (``init_vit``). Targets can be
standardised with train-split statistics (``target_norm: store``, recon/pretraining/targets.py); every
epoch, recon/pretraining/monitor.py measures the losses on fixed train and test shapes against their
mean-target baselines and probes the features against the same network at random init, both under
every BatchNorm treatment (history.csv).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from recon.network.model import ReConConfig, ReConPretrain, recalibrate_batchnorm
from recon.network.reference import init_from_vit
from recon.pretraining.data import (
    EpochBatches,
    PretrainDataset,
    fraction_of_stores,
    loader_workers,
    make_loader,
    open_pretrain_stores,
)
from recon.pretraining.monitor import PretrainMonitor
from recon.pretraining.targets import TARGET_NORMS, compute_target_stats
from recon.runtime import codedeps, trainstate
from recon.runtime.cudagraph import GraphedForwardBackward
from recon.runtime.distributed import Dist, setup, teardown
from recon.runtime.optim import Schedule, adamw, set_lr

LOSS_TERMS = ("rec", "img", "text", "smc")
#: name fragments of the distillation side, trained at ``query_lr_scale`` × lr: the [CLS]/IMG/TXT tokens
#: and positions, every block's query branch (``query_norm1/attn/norm2/mlp``; the two-tower baseline's whole
#: contrastive tower, ``encoder.query_tower.``) and the IMG/TXT projections. The multi-task baseline's one
#: shared Transformer trains at lr.
#: With stop-grad only the distillation losses train them ([CLS]: no default loss); the shared final
#: LayerNorm and the SMC head ``cls_proj`` stay at lr. tests/test_optim.py checks this against the model.
QUERY_SIDE = (".query_", "encoder.cls_", "encoder.img_", "encoder.text_", "img_proj.", "text_proj.")


@dataclass
class PretrainParams:
    variant: str = "tiny"          # student width: tiny (192/3) | small (256/4) | base (384/6)
    model: dict = field(default_factory=dict)  # ReConConfig overrides, e.g. {depth: 4, num_group: 32}
    epochs: int = 300              # passes over the pretraining shapes with the full objective (the paper: 300)
    batch_size: int = 128          # global batch per optimiser step
    micro_batch: int | None = None  # per-forward batch per process; accumulation fills the rest
    lr: float = 5e-4               # peak learning rate (AdamW, cosine)
    weight_decay: float = 0.05     # AdamW weight decay
    warmup_epochs: int = 10        # linear warm-up from warmup_lr to lr
    min_lr: float = 1e-6           # the cosine's floor
    warmup_lr: float = 1e-6        # the warm-up's start
    schedule: str = "epoch"        # "epoch": the reference (timm cosine, per epoch); "step": per optimiser step
    drop_path: float = 0.1         # stochastic depth rate of the transformer blocks
    n_points: int = 1024           # points per cloud (a random subset of the stored ones)
    rotate: bool = True            # rotate every training cloud by a random angle about the up axis
    #: the losses: rec (masked reconstruction), img, text (distillation)
    targets: list[str] = field(default_factory=lambda: ["rec", "img", "text"])
    global_loss: str = "smooth_l1"  # distillation loss: smooth_l1 (the reference) | l2 | cosine | infonce
    #: how the K image queries (model.img_queries) meet a shape's V cached views: none (K = 1: one random view
    #: per step, ReCon; K > 1: query k with view k, K = V) | hungarian (all V views, per shape the pairs of least
    #: total loss on the detached [K, V] loss matrix, ReCon++; one host transfer per step)
    match: str = "none"
    queries_per_view: bool = False  # model.img_queries = the image store's views per shape (ReCon++: one query a view)
    #: epochs of a reconstruction-only first stage (ReCon++'s generative stage; the distillation side, QUERY_SIDE,
    #: does not move) before the ``epochs`` of the full objective; each stage has its own warm-up + cosine schedule
    #: and fresh AdamW moments; 0 = one stage
    rec_epochs: int = 0
    #: a local timm ViT state dict (.safetensors or torch.save) whose blocks initialise both branches of the
    #: encoder blocks, as ReCon++ does (same depth and width; model.qkv_bias: true for a ViT with qkv biases); "" = none
    init_vit: str = ""
    stop_grad: bool = True         # the queries read the patch tokens detached (the reference; architecture recon only)
    #: recon (the reference) | multitask: one plain Transformer, patch rows reconstruct, queries distil (Table 9)
    #: | two_tower: a Point-MAE reconstruction Transformer + a separate contrastive one, features concatenated
    architecture: str = "recon"
    #: paired (the reference: a shape's own image targets) | unpaired: each epoch, another shape's of the same
    #: category (a seeded shuffle per (seed, epoch), Table 14)
    image_pairing: str = "paired"
    split: str = "all"             # shapes to pretrain on: all (the reference: ShapeNet train + test) | train
    #: data scaling (Fig. 1(a)): pretrain on this share of the split's shapes, in (0, 1]; per category
    #: max(1, round(fraction · n)), seeded by data_seed, nested across fractions (data.fraction_positions)
    data_fraction: float = 1.0
    data_seed: int | None = None   # the subset's seed; null: seed
    target_norm: str = "none"      # none (the reference: raw teacher features) | store (train-split mean/std)
    image_variants: str = "augmented"  # with A > 1 stored variants: augmented (1..A-1) | all (0 = clean too)
    monitor_shapes: int = 512      # per split, for the per-epoch losses/baselines/probe; 0 = no monitor
    monitor_every: int = 1         # epochs between monitor records (the last epoch always has one)
    baseline_seeds: int = 1        # random-init twins the probe compares with (mean ± std; the first = seed)
    #: BatchNorm treatments the monitor's probe measures the model and every twin under (saved | reset |
    #: recalibrated; saved is required): the statistics alone moved a linear probe by up to 7 points
    monitor_bn_treatments: list[str] = field(default_factory=lambda: ["saved", "reset", "recalibrated"])
    monitor_bn_clouds: int = 64    # monitor train clouds (seeded) the recalibrated treatment re-estimates them on
    bn_recalibrate: int = 0        # > 0: re-estimate BatchNorm running stats on this many train clouds each epoch
    query_lr_scale: float = 1.0    # lr multiplier of the query branch, query tokens and projections (distillation side)
    seed: int = 0                  # initialisation, subsets, masks and shuffling
    loader_workers: int | str = "auto"  # "auto": none on CPU, up to 4 per GPU process (recon.pretraining.data.loader_workers)
    device: str = "auto"           # auto | cpu | cuda[:i]
    compile: bool = False          # torch.compile the student
    cuda_graph: bool = False       # replay forward + backward (compiled or not) as one CUDA graph, one GPU
    keep_last: int = 3             # epoch checkpoints kept (resume from the newest)
    max_steps: int | None = None   # stop early (smoke tests); the schedule still spans all epochs


class NonFiniteLoss(RuntimeError):
    pass


def model_config(p: PretrainParams, image_dim: int, text_dim: int, views: int = 1) -> ReConConfig:
    """The student's config; ``views``: the image store's views per shape (``queries_per_view``)."""
    model = {**p.model, "img_queries": views} if p.queries_per_view else p.model
    return ReConConfig.variant(p.variant, **{"drop_path_rate": p.drop_path, "img_feat_dim": image_dim or 768,
                                             "text_feat_dim": text_dim or 512, "targets": tuple(p.targets),
                                             "global_loss": p.global_loss, "stop_grad": p.stop_grad,
                                             "architecture": p.architecture, "img_match": p.match, **model})


def build_model(p: PretrainParams, image_dim: int, text_dim: int, views: int = 1) -> ReConPretrain:
    return ReConPretrain(model_config(p, image_dim, text_dim, views))


def uses_all_views(cfg: ReConConfig) -> bool:
    """Whether the image targets are every cached view of a shape ([V, D] per item: K > 1 image queries,
    or the matching) rather than one random view ([D], ReCon)."""
    return cfg.img_queries > 1 or cfg.img_match != "none"


def _accumulation(p: PretrainParams, world: int) -> tuple[int, int]:
    micro = p.micro_batch or p.batch_size // world
    steps = max(1, p.batch_size // (micro * world))
    if micro * world * steps != p.batch_size:
        raise ValueError(f"batch_size {p.batch_size} is not micro_batch {micro} × world {world} × k")
    return micro, steps


def check_cuda_graph(p: PretrainParams, d: Dist) -> None:
    """Refuse, before any work, the settings a captured step cannot follow."""
    if not p.cuda_graph:
        return
    if d.device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device; this run is on {d.device}")
    if d.enabled:
        raise ValueError("cuda_graph runs on one GPU; under torchrun/DDP leave it off")
    if p.match == "hungarian":
        raise ValueError("cuda_graph cannot capture match: hungarian (the matching reads the loss matrix on the host)")
    if p.rec_epochs > 0:
        raise ValueError("cuda_graph replays one objective; with rec_epochs > 0 the step changes at the stage boundary")


def pretrain_optimizer(model: torch.nn.Module, p: PretrainParams) -> torch.optim.AdamW:
    """AdamW with the reference parameter groups: the distillation side (:data:`QUERY_SIDE`) at
    ``query_lr_scale`` × ``lr``, the rest at ``lr`` (one group of rates when the scale is 1)."""
    return adamw(model, p.weight_decay, p.lr, QUERY_SIDE if p.query_lr_scale != 1.0 else (), p.query_lr_scale)


def train(p: PretrainParams, cache: Path, out: Path, progress_factory=None,
          log=print) -> dict[str, Any]:
    """Pretrain; returns the final metrics. Checkpoints go to ``out/checkpoints``, per-epoch
    metrics to ``out/history.csv``."""
    d = setup(p.device)
    try:
        return _train(p, d, cache, out, progress_factory, log)
    finally:
        teardown(d)


def _train(p: PretrainParams, d: Dist, cache: Path, out: Path, progress_factory, log) -> dict[str, Any]:
    check_cuda_graph(p, d)
    if p.split not in ("all", "train"):
        raise ValueError(f"unknown split {p.split!r}; choose from all, train")
    if p.target_norm not in TARGET_NORMS:
        raise ValueError(f"unknown target_norm {p.target_norm!r}; choose from {TARGET_NORMS}")
    if p.rec_epochs < 0 or (p.rec_epochs > 0 and "rec" not in p.targets):
        raise ValueError(f"rec_epochs {p.rec_epochs}: a reconstruction-only stage needs rec_epochs >= 0 and 'rec' in targets")
    torch.manual_seed(p.seed + d.rank)
    use_image, use_text = "img" in p.targets, "text" in p.targets
    stores = open_pretrain_stores(cache, use_image, use_text, log=log if d.is_main else None)
    if len(stores.rows) == 0:
        raise ValueError("no usable shapes: every shape failed an earlier stage")
    if stores.excluded and d.is_main:
        log(f"pretrain: {stores.excluded} shapes excluded (failed in an earlier stage)")
    split = stores.shapes["split"].to_numpy()[stores.rows]
    train_rows, test_rows = stores.rows[split == "train"], stores.rows[split == "test"]
    if p.split == "train":  # the test split stays held out: the monitor's test figures are honest
        if len(train_rows) == 0:
            raise ValueError("split: train, but no usable shape is in the train split")
        stores = dataclasses.replace(stores, rows=train_rows)
    # data scaling: a stratified, seeded share of those shapes (fraction 1: the same stores, untouched)
    stores, data = fraction_of_stores(stores, p.data_fraction, p.seed if p.data_seed is None else p.data_seed)
    if p.data_fraction != 1.0 and d.is_main:
        log(f"pretrain: data_fraction {p.data_fraction:g}: {data['shapes']} of {data['of']} shapes "
            f"(≥ 1 per category, seed {data['data_seed']})")
    cfg = model_config(p, stores.image_dim, stores.text_dim, stores.image.shape[1] if use_image else 1)
    if use_image and cfg.img_match == "none" and cfg.img_queries > 1 and cfg.img_queries != stores.image.shape[1]:
        raise ValueError(f"match: none pairs image query k with view k, but the model has {cfg.img_queries} image "
                         f"queries and the store {stores.image.shape[1]} views (use match: hungarian)")
    dataset = PretrainDataset(stores, p.n_points, p.rotate, p.seed, p.image_variants, p.image_pairing,
                              all_views=use_image and uses_all_views(cfg))
    variants = dataset.variants or range(0)
    micro, accum = _accumulation(p, d.world)
    # whole micro-batches from persistent workers, each item's draws seeded by (seed, epoch, index)
    sampler = EpochBatches(dataset, micro, p.seed, d.rank, d.world)
    workers = loader_workers(p.loader_workers, d.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    loader = make_loader(dataset, sampler, workers, pin_memory=d.device.type == "cuda")
    if d.is_main:
        log(f"pretrain: {len(dataset)} shapes, micro-batches of {micro} built by "
            f"{workers or 'no'} loader worker{'s' if workers != 1 else ''} per process")
    model = ReConPretrain(cfg)
    if p.init_vit:   # before the move: the copy is on the CPU; a resumed run's checkpoint overrides it
        init_from_vit(model, p.init_vit)
    model = model.to(d.device)
    stats = None
    if p.target_norm == "store":  # train-split statistics of the cached targets, computed once
        stats = compute_target_stats(stores.image, stores.text, stores.category_index,
                                     train_rows if len(train_rows) else stores.rows,
                                     slice(variants.start, variants.stop))
    model.target_stats = stats
    calibration = None
    if p.bn_recalibrate > 0:  # fixed augmented train clouds for precise BatchNorm statistics (no global RNG)
        calibration = calibration_clouds(stores, p.bn_recalibrate, p.n_points, p.rotate, p.seed).to(d.device)
    monitor = None
    if p.monitor_shapes > 0 and d.is_main:  # built before training: its random-init twin is the untrained model
        monitor = PretrainMonitor(stores, train_rows, test_rows, model, p.global_loss, p.n_points, variants, stats,
                                  p.monitor_shapes, p.seed, device=d.device, baseline_seeds=p.baseline_seeds,
                                  bn_treatments=p.monitor_bn_treatments, bn_clouds=p.monitor_bn_clouds)
    optimizer = pretrain_optimizer(model, p)
    ckpt_dir = out / "checkpoints"
    start_epoch, step, history = 0, 0, []
    identity = run_identity(p, stores)   # once: with init_vit it hashes the ViT file
    state = trainstate.resume(ckpt_dir, identity, d, log, "pretrain")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], json.loads(state["history"])
        trainstate.set_rng_state(state["rng"])
    net = torch.compile(model) if p.compile else model
    if d.enabled:   # heads of switched-off targets, and the query side in a reconstruction-only stage, get no grad
        unused = set(p.targets) != {"rec", "img", "text"} or p.rec_epochs > 0
        net = DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                  find_unused_parameters=unused)

    steps_per_epoch = len(dataset) // (micro * d.world * accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} shapes is fewer than one batch of {p.batch_size}")
    total_epochs = p.rec_epochs + p.epochs
    query_side = [param for name, param in model.named_parameters() if any(f in name for f in QUERY_SIDE)]
    schedules = {stage: Schedule(p.schedule, epochs, p.warmup_epochs, steps_per_epoch, p.lr, p.min_lr, p.warmup_lr)
                 for stage, epochs in (("rec", p.rec_epochs), ("full", p.epochs)) if epochs > 0}
    on_cuda = d.device.type == "cuda"

    def forward_terms(points, img, text, labels):
        """(loss share of this micro-batch, detached [loss, *LOSS_TERMS]) for one micro-batch."""
        # autocast's weight cache must be off while a CUDA graph captures
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not p.cuda_graph) if on_cuda else nullcontext():
            outputs = net(points, img, text, labels=labels)
        terms = torch.stack([outputs["loss" if k == "loss" else f"loss_{k}"].detach().float()
                             for k in ("loss", *LOSS_TERMS)])
        return outputs["loss"] / accum, terms

    graphed = GraphedForwardBackward(forward_terms, model) if p.cuda_graph else None

    for epoch in range(start_epoch, total_epochs):
        # stages: epochs 0..rec_epochs-1 reconstruct only, then the full objective; each stage's schedule
        # counts its own steps from the step its first epoch began at (the history says which, on resume too)
        stage = "rec" if epoch < p.rec_epochs else "full"
        schedule = schedules[stage]
        stage_start = 0 if stage == "rec" or p.rec_epochs == 0 else \
            next(r["step"] for r in history if r["epoch"] == p.rec_epochs - 1)
        if p.rec_epochs > 0 and epoch == p.rec_epochs:   # the full objective starts as a new run: fresh AdamW moments
            optimizer = pretrain_optimizer(model, p)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)  # its batches carry the epoch to the workers
        model.train()
        sums = {k: 0.0 for k in ("loss", *LOSS_TERMS)}
        seen, t0, t_data = 0, time.perf_counter(), 0.0
        title = f"epoch {epoch + 1}/{total_epochs}" + (" (reconstruction only)" if stage == "rec" else "")
        bar = progress_factory(title, steps_per_epoch) if progress_factory and d.is_main else None
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            set_lr(optimizer, schedule.lr(step - stage_start))
            for micro_step in range(accum):
                t = time.perf_counter()
                batch = next(batches)
                t_data += time.perf_counter() - t
                batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
                if stats is not None:  # standardised targets: both terms on one scale
                    batch.update({k: stats.normalize(k, batch[k]) for k in ("img", "text") if k in batch})
                inputs = (batch["points"], batch.get("img"), batch.get("text"), batch["label"])
                if stage == "rec":   # no distillation (nor SMC) target: the query side gets no gradient
                    inputs = (batch["points"], None, None, None)
                if graphed is not None:
                    terms = graphed(*inputs).tolist()
                else:
                    sync = micro_step == accum - 1 or not d.enabled
                    with net.no_sync() if not sync else nullcontext():
                        loss, terms = forward_terms(*inputs)
                        loss.backward()  # queued before the one host read below, which it then overlaps
                    terms = terms.tolist()
                bad = not math.isfinite(terms[0])
                if d.any(bad):  # every rank stops before an optimizer step can use the gradients
                    where = f"batch shape rows {batch['index'].tolist()}" if bad else "on another rank"
                    raise NonFiniteLoss(f"non-finite loss {terms[0]} at epoch {epoch}, step {step}; {where}")
                for k, value in zip(sums, terms):
                    sums[k] += value * batch["points"].shape[0]
                seen += batch["points"].shape[0]
            if stage == "rec":   # the distillation side has no loss yet: its (zero) gradients make no AdamW step,
                for param in query_side:   # so no weight decay either; it enters the full stage as initialised (ReCon++)
                    param.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=graphed is None)  # a graph keeps its gradient buffers
            step += 1
            if bar is not None:
                bar.update(**{k: sums[k] / seen for k in ("loss", "rec", "img", "text")})
            if p.max_steps is not None and step >= p.max_steps:
                break
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        record = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0),
                  **{("loss" if k == "loss" else f"loss_{k}"): sums[k] / max(seen, 1) for k in sums},
                  "samples_per_s": seen * d.world / elapsed, "data_s": t_data, "epoch_s": elapsed}
        if p.rec_epochs > 0:
            record["stage"] = stage
        t = time.perf_counter()
        last = epoch + 1 == total_epochs or (p.max_steps is not None and step >= p.max_steps)
        monitoring = monitor is not None and ((epoch + 1) % max(p.monitor_every, 1) == 0 or last)
        if calibration is not None:  # eval-mode statistics that match the weights (train mode ignores them);
            # the projection norms need a full encoder pass: only where something evaluates them
            recalibrate_batchnorm(model, calibration, projections=monitoring or last)
        if monitoring:
            # eval mode, fixed inputs, no global RNG: training is unchanged
            record.update(monitor.record(model))
            record["monitor_s"] = time.perf_counter() - t
        history.append(record)
        if d.is_main:
            trainstate.save(ckpt_dir, epoch, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "step": step, "rng": trainstate.rng_state(), "params": trainstate.jsonable(p),
                "run": identity, "target_stats": stats.state() if stats else None,
                "config": trainstate.jsonable(model.cfg), "history": json.dumps(history)}, p.keep_last)
            trainstate.write_history(out, history)
            log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                                               for k, v in record.items() if k != "epoch"))
        d.barrier()
        if p.max_steps is not None and step >= p.max_steps:
            break
    if d.is_main and history:  # also when a finished run is resumed (dvc removes outputs first)
        trainstate.write_history(out, history)
    return {"history": history, "model": model, "stores": stores, "monitor": monitor, "stats": stats, "data": data}


def calibration_clouds(stores, count: int, n_points: int, rotate: bool, seed: int) -> torch.Tensor:
    """``count`` training clouds as the trainer draws them (subset, rotation), fixed by ``seed``."""
    data = PretrainDataset(stores, n_points, rotate, seed + 7919)
    rows = np.random.default_rng(seed).permutation(len(data))[:count]
    return torch.stack([data[int(i)]["points"] for i in rows])


RUNTIME_ONLY = ("device", "loader_workers", "compile", "cuda_graph", "keep_last", "max_steps")


#: the files whose source decides what training computes or records: this module's import closure
#: (the pretrain stage's dvc.yaml deps hold them all, ``tests/test_codedeps.py`` checks it)
TRAINING_CODE = codedeps.closure(__name__)


def run_identity(p: PretrainParams, stores) -> dict:
    """What a resumed run must share with the checkpoint: params (less runtime-only knobs), the
    params of the stores it trains on, and the training code."""
    params = {k: v for k, v in trainstate.jsonable(p).items() if k not in RUNTIME_ONLY}
    identity = {"params": params, "stores": stores.fingerprint, "code": trainstate.code_fingerprint(*TRAINING_CODE)}
    if p.init_vit:   # the ViT file's content, not just its path
        identity["init_vit_sha256"] = hashlib.sha256(Path(p.init_vit).read_bytes()).hexdigest()
    return identity
