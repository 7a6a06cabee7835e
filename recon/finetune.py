"""Fine-tuning ReCon classifiers on a classification store (``pipeline/convert.py`` layout).

Protocols: ``full`` (everything trains), ``mlp3`` / ``linear`` (only the head and the [CLS]
token/position train; the backbone is frozen, its BatchNorm statistics too). Dataset profiles carry
the SPEC recipes; any field can be overridden. The recipe: AdamW (wd 0.05, none on 1-D/bias/tokens),
warm-up + cosine per epoch as the reference (per step: ``schedule: step``, the demo's), head and
[CLS] at 10x lr, grad-norm clip 10, drop path 0.2.

Data, sampling and augmentation: ``recon/cls_data.py``; weights in and out: ``recon/weights.py``;
inference: ``recon/inference.py``; metrics and plots: ``recon/metrics.py``.

Honest reporting: the reported model is the last epoch, or the epoch of best accuracy on a
validation split carved from the training split (``val_fraction``); the test split is looked
at once, after training. A ``seeds`` sweep reports mean ± std (ddof 0) over the seeds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from pipeline import layout
from recon import trainstate
from recon.cls_data import AUGMENTATIONS, ClsData, TrainSet, prepare, stratified_split
from recon.distributed import Dist, pick_device
from recon.inference import autocast_for, evaluate_classifier, predict_logits
from recon.metrics import accuracy, write_confusion
from recon.model import ReConClassifier
from recon.optim import SCHEDULES, Schedule, adamw, set_lr
from recon.weights import InitSource, build_classifier, save_model

PROTOCOLS = ("full", "mlp3", "linear")   # ReConClassifier head kinds
BOOSTED = ("head.", "encoder.cls_token", "encoder.cls_pos")


# ----------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """A dataset recipe (SPEC "Fine-tuning and evaluation"; few-shot from the reference config)."""

    n_points: int
    num_group: int
    group_size: int
    lr: float
    epochs: int
    warmup_epochs: int
    batch_size: int
    drop_path: float
    augment: str           # training augmentation
    vote_augment: str      # augmentation of the voting passes
    normalize: bool        # centre + unit sphere before sampling (ModelNet: yes; ScanObjectNN: no)
    schedule: str = "epoch"  # learning-rate granularity: "epoch" (the reference) or "step"


# Voting as the reference runner's ``validate_vote``/``test_vote``: ModelNet scales, ScanObjectNN
# PB_T50_RS ("hardest") rotates, every other dataset (OBJ_BG, OBJ_ONLY, few-shot) only resamples.
# Training: ModelNet scales and translates, every other dataset rotates.
_SCANOBJECTNN = Profile(2048, 128, 32, 2e-5, 300, 10, 32, 0.2, "rotate", "none", False)
PROFILES: dict[str, Profile] = {
    "scanobjectnn": dataclasses.replace(_SCANOBJECTNN, vote_augment="rotate"),  # = scanobjectnn-hardest
    "scanobjectnn-hardest": dataclasses.replace(_SCANOBJECTNN, vote_augment="rotate"),   # PB_T50_RS
    "scanobjectnn-objbg": _SCANOBJECTNN,
    "scanobjectnn-objonly": _SCANOBJECTNN,
    "modelnet40": Profile(1024, 64, 32, 1e-5, 300, 10, 32, 0.2, "scale_translate", "scale", True),
    "modelnet40-8k": Profile(8192, 512, 32, 1e-5, 300, 10, 32, 0.2, "scale_translate", "scale", True),
    # reference cfgs/full/fewshot.yaml: lr 5e-4, 150 epochs, drop path 0.1; its runner rotates
    # (the few-shot dataset is not named "ModelNet", so it gets the non-ModelNet augmentation)
    "fewshot": Profile(1024, 64, 32, 5e-4, 150, 10, 32, 0.1, "rotate", "none", True),
    # the embedded demo: a short, larger-lr schedule stepped per optimiser step (not a paper recipe)
    "demo": Profile(1024, 64, 32, 2e-4, 20, 2, 16, 0.2, "scale_translate", "scale", True, "step"),
}
#: part segmentation (``recon/partseg_finetune.py``): the reference's ShapeNetPart recipe (batch 16,
#: 300 epochs, lr 1e-4 with the new layers at 10x, 10 warm-up epochs, 2,048 points, 128 groups of
#: 32, drop path 0.1, no voting), and the demo's, small enough for a minute on two CPU cores
PARTSEG_PROFILES: dict[str, Profile] = {
    "shapenetpart": Profile(2048, 128, 32, 1e-4, 300, 10, 16, 0.1, "scale_shift", "none", False),
    "demo-partseg": Profile(256, 16, 32, 1e-3, 5, 1, 16, 0.1, "scale_shift", "none", False, "step"),
}
SEG_AUGMENTATIONS = ("none", "scale_shift")   # scale_shift: recon.partseg_data.scale_and_translate
#: the ScanObjectNN variant (``pipeline/convert.py``) each ScanObjectNN profile is the recipe for
SCANOBJECTNN_VARIANTS = {"scanobjectnn": "PB_T50_RS", "scanobjectnn-hardest": "PB_T50_RS",
                         "scanobjectnn-objbg": "OBJ_BG", "scanobjectnn-objonly": "OBJ_ONLY"}


@dataclass
class FinetuneParams:
    profile: str = "demo"
    store: str = layout.default(layout.DEMO_STORE)
    init: str = layout.default(layout.PRETRAINED)  # our model.pt / epoch checkpoint, a reference .pth, or "scratch"
    variant: str = "tiny"                    # architecture when init is "scratch"
    model: dict = field(default_factory=dict)  # ReConConfig overrides
    seg: dict = field(default_factory=dict)    # PartSegConfig overrides (part segmentation)
    protocol: str = "full"                   # full | mlp3 | linear
    # None: the profile's value
    n_points: int | None = None
    num_group: int | None = None
    group_size: int | None = None
    lr: float | None = None
    epochs: int | None = None
    warmup_epochs: int | None = None
    batch_size: int | None = None
    drop_path: float | None = None
    augment: str | None = None
    vote_augment: str | None = None
    normalize: bool | None = None
    schedule: str | None = None
    weight_decay: float = 0.05
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    head_lr_scale: float = 10.0
    grad_clip: float = 10.0
    votes: int = 10
    val_fraction: float = 0.0                # > 0: select the epoch by accuracy on a validation split
    seed: int = 0
    seeds: list[int] | None = None           # a sweep: mean ± std over these seeds
    eval_batch: int = 64
    loader_workers: int = 0
    device: str = "auto"
    keep_last: int = 2
    max_steps: int | None = None             # stop early (smoke tests)

    @property
    def task(self) -> str:
        """``partseg`` for a part-segmentation profile, else ``classification``."""
        return "partseg" if self.profile in PARTSEG_PROFILES else "classification"

    def recipe(self) -> Profile:
        """The profile with this run's overrides applied."""
        profiles = {**PROFILES, **PARTSEG_PROFILES}
        if self.profile not in profiles:
            raise ValueError(f"unknown profile {self.profile!r}; choose from {list(profiles)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose from {list(PROTOCOLS)}")
        if self.task == "partseg" and self.protocol != "full":
            raise ValueError(f"part segmentation fine-tunes everything (protocol full), not {self.protocol!r}")
        base = profiles[self.profile]
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(Profile)
                   if getattr(self, f.name) is not None}
        recipe = dataclasses.replace(base, **changes)
        allowed = SEG_AUGMENTATIONS if self.task == "partseg" else AUGMENTATIONS
        for kind in (recipe.augment, recipe.vote_augment):
            if kind not in allowed:
                raise ValueError(f"unknown augmentation {kind!r}; choose from {allowed}")
        if recipe.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {recipe.schedule!r}; choose from {SCHEDULES}")
        return recipe

    def check_store(self, store_params: dict) -> None:
        """Refuse a ScanObjectNN profile on a store of another ScanObjectNN variant: the variants
        vote differently (the reference rotates only PB_T50_RS)."""
        want = SCANOBJECTNN_VARIANTS.get(self.profile)
        have = store_params.get("variant") if store_params.get("format") == "scanobjectnn" else None
        if want and have and have != want:
            choices = [k for k, v in SCANOBJECTNN_VARIANTS.items() if v == have]
            raise ValueError(f"profile {self.profile!r} is the {want} recipe but the store holds {have}: "
                             f"use profile {choices[-1]!r}")

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]


RUNTIME_ONLY = ("device", "loader_workers", "keep_last", "max_steps", "eval_batch", "votes", "seeds", "seed", "store")


# ----------------------------------------------------------------------------- tasks


class Task(Protocol):
    """What the fine-tuning loop needs to know about a task (classification, part segmentation)."""

    name: str                    # "classification" | "partseg"
    code: tuple[str, ...]        # modules whose source decides what the task computes (besides TRAINING_CODE)
    selection_key: str | None    # a per-epoch validation figure whose best epoch is reported instead of the last
    selection_name: str          # how metrics.json names that choice

    @property
    def train_size(self) -> int: ...

    def dataset(self) -> Dataset:
        """Training items (dicts of tensors), with ``set_epoch(epoch)`` for the seeded draws."""

    def build_model(self) -> nn.Module: ...

    def boosted(self, model: nn.Module) -> tuple[str, ...]:
        """Parameter names (substrings) trained at ``head_lr_scale`` x the learning rate."""

    def logits_and_targets(self, net: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        """Logits [M, K] and targets [M] of a batch: cross entropy and accuracy are taken over the M rows."""

    def epoch_figures(self, model: nn.Module) -> dict[str, float]:
        """Figures recorded in the history after every epoch (a validation accuracy, a test mIoU)."""

    def evaluate(self, model: nn.Module, out: Path | None, title: str) -> tuple[dict[str, Any], np.ndarray | None]:
        """Score the reported model once on the test split: (metrics, predictions); writes its pictures in ``out``."""

    def save(self, path: Path, model: nn.Module, epoch: int) -> None: ...


class ClassificationTask:
    """Shape classification on a classification store: FPS supersets, random subsets, the profile's
    augmentation; optional validation split (``val_fraction``) to select the epoch; single-pass and
    voted test accuracy, per-class accuracy and the confusion plot."""

    name, code = "classification", ()

    def __init__(self, p: FinetuneParams, train: ClsData, test: ClsData | None, seed: int,
                 init: InitSource | None, device: torch.device):
        self.p, self.recipe, self.seed, self.init, self.device = p, p.recipe(), seed, init, device
        self.val = None
        if p.val_fraction > 0:
            tr_rows, val_rows = stratified_split(train.labels, p.val_fraction, seed)
            train, self.val = train.subset(tr_rows), train.subset(val_rows)
        if len(train) < 2:
            raise ValueError(f"{len(train)} training shapes: need at least 2 (BatchNorm in the head)")
        self.train, self.test = train, test
        self.selection_key = "val_acc" if self.val is not None else None
        self.selection_name = "best validation accuracy"
        self.val_clouds = prepare(self.val, self.recipe, device)[:, :self.recipe.n_points] \
            if self.val is not None and len(self.val) else None

    @property
    def train_size(self) -> int:
        return len(self.train)

    def dataset(self) -> TrainSet:
        superset = prepare(self.train, self.recipe, self.device)
        return TrainSet(superset, self.train.labels, self.recipe.n_points, self.recipe.augment, self.seed)

    def build_model(self) -> ReConClassifier:
        return build_classifier(self.p, self.train.num_classes, self.init, self.recipe)

    def boosted(self, model: nn.Module) -> tuple[str, ...]:
        return BOOSTED

    def logits_and_targets(self, net: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        return net(batch["points"].to(device)), batch["label"].to(device)

    def epoch_figures(self, model: nn.Module) -> dict[str, float]:
        if self.val_clouds is None:
            return {}
        logits = predict_logits(model, self.val_clouds, self.p.eval_batch, self.device)
        return {"val_acc": accuracy(logits.argmax(1), self.val.labels)}

    def evaluate(self, model: nn.Module, out: Path | None, title: str) -> tuple[dict[str, Any], np.ndarray | None]:
        metrics: dict[str, Any] = {}
        if self.val is not None:
            metrics["val_shapes"] = len(self.val)
        if self.test is None or not len(self.test):
            return metrics, None
        result = evaluate_classifier(model, self.test, self.recipe, self.p.votes, self.seed, self.p.eval_batch,
                                     self.device)
        pred = result.pop("_pred")
        metrics.update(result)
        if out is not None:
            write_confusion(out, pred, self.test.labels, self.test.class_names,
                            f"{title}: {metrics['test_acc']:.2f}% (single pass)")
        return metrics, pred

    def save(self, path: Path, model: nn.Module, epoch: int) -> None:
        save_model(path, model, self.train.class_names, self.p, self.recipe, epoch)


# ----------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    model: nn.Module
    metrics: dict[str, Any]
    history: list[dict]
    pred: np.ndarray | None = None


#: the modules whose source decides what fine-tuning computes (dvc.yaml lists them as deps too)
TRAINING_CODE = ("recon.model", "recon.pointops", "recon.data", "recon.optim", "recon.checkpoint", "recon.finetune",
                 "recon.cls_data", "recon.weights", "recon.inference", "recon.metrics")


def run_identity(p: FinetuneParams, seed: int, store_fingerprint: Any, init: InitSource | None = None,
                 code: tuple[str, ...] = ()) -> dict:
    """What a resumed run must share with its checkpoint: params, seed, data, the initial
    weights themselves (a re-pretrained ``model.pt`` at the same path is another run) and the
    training code."""
    params = {k: v for k, v in trainstate.jsonable(p).items() if k not in RUNTIME_ONLY}
    return {"params": params, "seed": seed, "store": store_fingerprint,
            "init": trainstate.state_digest(init.state) if init is not None else "scratch",
            "code": trainstate.code_fingerprint(*TRAINING_CODE, *code)}


def finetune(p: FinetuneParams, train: ClsData, test: ClsData | None, seed: int, out: Path | None = None,
             d: Dist | None = None, init: InitSource | None = None, store_fingerprint: Any = None,
             progress_factory: Callable | None = None, log=print) -> FinetuneResult:
    """Fine-tune a classifier on ``train`` and evaluate the selected model once on ``test``.

    With ``out``: per-epoch atomic checkpoints in ``out/checkpoints`` (exact resume), ``history.csv``,
    and, on the main rank, ``model.pt``, ``metrics.json``, ``confusion.csv`` / ``confusion.png``.
    """
    d = d or Dist(device=pick_device(p.device))
    task = ClassificationTask(p, train, test, seed, init, d.device)
    return train_task(p, task, seed, out, d, init, store_fingerprint, progress_factory, log)


def train_task(p: FinetuneParams, task: Task, seed: int, out: Path | None = None, d: Dist | None = None,
               init: InitSource | None = None, store_fingerprint: Any = None,
               progress_factory: Callable | None = None, log=print) -> FinetuneResult:
    """The fine-tuning loop of every task: cross entropy, AdamW with the task's boosted names,
    warm-up + cosine, grad-norm clip; exact resume from ``out/checkpoints``; the last epoch (or
    the best by ``task.selection_key``, never a test figure) is scored once by ``task.evaluate``."""
    d = d or Dist(device=pick_device(p.device))
    recipe = p.recipe()
    device = d.device
    torch.manual_seed(seed + d.rank)
    dataset = task.dataset()
    micro = max(2, min(recipe.batch_size // d.world, len(dataset) // d.world))
    steps_per_epoch = len(dataset) // (micro * d.world)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training shapes is fewer than one batch on {d.world} processes")
    model = task.build_model().to(device)
    optimizer = adamw(model, p.weight_decay, recipe.lr, task.boosted(model), p.head_lr_scale)
    identity = run_identity(p, seed, store_fingerprint, init, task.code)
    ckpt_dir = out / "checkpoints" if out is not None else None
    start_epoch, step, history, best = 0, 0, [], None
    state = trainstate.resume(ckpt_dir, identity, d, log, "finetune") if ckpt_dir is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], json.loads(state["history"])
        best = state.get("best")
        trainstate.set_rng_state(state["rng"])
    net: torch.nn.Module = model
    if d.enabled:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(dataset, d.world, d.rank, shuffle=True, seed=seed, drop_last=True) if d.enabled else None
    schedule = Schedule(recipe.schedule, recipe.epochs, recipe.warmup_epochs, steps_per_epoch, recipe.lr,
                        p.min_lr, p.warmup_lr)
    trainable = [q for q in model.parameters() if q.requires_grad]
    autocast = autocast_for(device)
    key = task.selection_key

    for epoch in range(start_epoch, recipe.epochs):
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        order = sampler if sampler is not None else \
            RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        loader = DataLoader(dataset, batch_size=micro, sampler=order, drop_last=True, num_workers=p.loader_workers)
        net.train()
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = progress_factory(f"finetune epoch {epoch + 1}/{recipe.epochs}", steps_per_epoch) \
            if progress_factory and d.is_main else None
        for batch in loader:
            set_lr(optimizer, schedule.lr(step))
            # forward in bf16 on CUDA; the loss in float32 over every row (shape or point)
            with autocast:
                logits, targets = task.logits_and_targets(net, batch, device)
            loss = F.cross_entropy(logits.float(), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, p.grad_clip)
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
            if bar is not None:
                bar.update(loss=loss_sum / seen, acc=100 * correct / seen)
            if p.max_steps is not None and step >= p.max_steps:
                break
        if bar is not None:
            bar.close()
        group = optimizer.param_groups[0]
        record = {"epoch": epoch, "step": step, "lr": group["lr"] / group.get("lr_scale", 1.0),
                  "loss": loss_sum / max(seen, 1), "train_acc": 100 * correct / max(seen, 1),
                  "epoch_s": time.perf_counter() - t0}
        # per-epoch figures for the history; only a validation figure may select the reported epoch
        record.update(task.epoch_figures(model))
        if key is not None and (best is None or record[key] > best[key]):
            best = {"epoch": epoch, key: record[key],
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        history.append(record)
        if d.is_main and ckpt_dir is not None:
            trainstate.save(ckpt_dir, epoch, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                "rng": trainstate.rng_state(), "run": identity, "config": trainstate.jsonable(model.cfg),
                "history": json.dumps(history), **({"best": best} if best is not None else {})}, p.keep_last)
            trainstate.write_history(out, history)
        if d.is_main:
            log(f"finetune epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        d.barrier()
        if p.max_steps is not None and step >= p.max_steps:
            break

    if d.is_main and out is not None and history:  # also when a finished run is resumed
        trainstate.write_history(out, history)
    selection, selected_epoch = "last epoch", history[-1]["epoch"] if history else -1
    if best is not None:
        model.load_state_dict(best["model"])
        selection, selected_epoch = task.selection_name, best["epoch"]
    metrics: dict[str, Any] = {"seed": seed, "protocol": p.protocol, "profile": p.profile,
                               "selection": selection, "selected_epoch": selected_epoch,
                               "epochs": len(history), "train_shapes": task.train_size}
    if best is not None:
        metrics[key] = best[key]
    pred = None
    if d.is_main:
        result, pred = task.evaluate(model, out, f"{p.profile} {p.protocol} seed {seed}")
        metrics.update(result)
    if d.is_main and out is not None:
        task.save(out / "model.pt", model, selected_epoch)
        trainstate.write_json(out / "metrics.json", metrics)
    return FinetuneResult(model, metrics, history, pred)
