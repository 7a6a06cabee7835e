"""Fine-tuning ReCon classifiers on a classification store (``pipeline/convert.py`` layout).

Protocols: ``full`` (everything trains), ``mlp3`` / ``linear`` (only the head and the [CLS]
token/position train; the backbone is frozen, its BatchNorm statistics too). Dataset profiles carry
the paper's recipes (``recon/downstream/recipes.py`` ``PROFILES``); any field can be overridden.
The recipe: AdamW (wd 0.05, none on 1-D/bias/tokens), warm-up + cosine per epoch as the reference
(per step: ``schedule: step``, the demo's), head and [CLS] at 10x lr, grad-norm clip 10, drop path 0.2.

Data, sampling and augmentation: ``recon/downstream/cls_data.py``; weights in and out: ``recon/downstream/weights.py``;
inference: ``recon/downstream/inference.py``; metrics and plots: ``recon/downstream/metrics.py``.

Honest reporting: the reported model is the last epoch, or the epoch of best accuracy on a
validation split carved from the training split (``val_fraction``); the test split is looked
at once, after training. A ``seeds`` sweep reports mean ± std (ddof 0) over the seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from recon.downstream.cls_data import ClsData, TrainSet, prepare, stratified_split
from recon.downstream.inference import autocast_for, evaluate_classifier, predict_logits
from recon.downstream.metrics import accuracy, write_confusion
from recon.downstream.recipes import RUNTIME_ONLY, FinetuneParams
from recon.downstream.weights import InitSource, build_classifier, save_model
from recon.network.model import ReConClassifier
from recon.runtime import codedeps, trainstate
from recon.runtime.distributed import Dist, pick_device
from recon.runtime.optim import Schedule, adamw, set_lr

BOOSTED = ("head.", "encoder.cls_token", "encoder.cls_pos")   # trained at head_lr_scale x lr


# ----------------------------------------------------------------------------- tasks


class Task(Protocol):
    """What the fine-tuning loop needs to know about a task (classification, part segmentation)."""

    name: str                    # "classification" | "partseg"
    code: tuple[str, ...]        # files whose source decides what the task computes: its module's codedeps.closure
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


#: the files whose source decides what fine-tuning computes: this module's import closure (the
#: finetune and partseg stages' dvc.yaml deps hold them all, ``tests/test_codedeps.py`` checks it)
TRAINING_CODE = codedeps.closure(__name__)


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
