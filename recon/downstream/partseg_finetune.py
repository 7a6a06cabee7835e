"""Fine-tuning part segmentation (ShapeNetPart, the demo's parts) with the loop of ``recon.downstream.finetune``.

The reference recipe (``segmentation/main.py``; profile ``shapenetpart``): train on train + val,
score on test; every training item redraws ``n_points`` points with replacement from the stored
cloud and is scaled and shifted (``recon.downstream.partseg_data``); loss = cross entropy over all parts;
AdamW with the new layers (``ReConPartSeg.lr_boost_names``) at 10x the learning rate; warm-up +
cosine per epoch. A prediction is the argmax over the shape's category parts; instance mIoU,
class mIoU and per-category mIoU as ``recon.downstream.partseg_metrics``. The test mIoU is recorded in the
history after every epoch (as the reference prints it) but never selects anything: the reported
model is the last epoch's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recon.downstream.finetune import FinetuneResult, train_task
from recon.downstream.inference import evaluating
from recon.downstream.partseg_data import SegData, SegTrainSet
from recon.downstream.partseg_metrics import miou_summary, plot_parts, restrict_to_category, shape_ious
from recon.downstream.partseg_net import PartSegConfig, ReConPartSeg, load_encoder
from recon.downstream.recipes import PartSegParams, Profile
from recon.downstream.weights import InitSource, classifier_config
from recon.network.model import ReConConfig
from recon.runtime import codedeps, trainstate
from recon.runtime.distributed import Dist, pick_device

PICTURE = "parts.png"
PICTURE_SHAPES = 4


def feature_blocks_for(depth: int) -> tuple[int, ...]:
    """The reference's blocks 4, 8 and 12 of 12 (0-based 3, 7, 11), spread the same way over
    another depth: the last block of each third."""
    return tuple(sorted({max(round(depth * k / 3) - 1, 0) for k in (1, 2, 3)}))


def build_partseg(p: PartSegParams, data: SegData, init: InitSource | None) -> ReConPartSeg:
    """The segmentation network for ``data``'s parts and categories; the encoder from ``init``."""
    cfg = classifier_config(init, p.variant, p.model, p.recipe())
    seg = PartSegConfig(**{"feature_blocks": feature_blocks_for(cfg.depth), **p.seg,
                           "num_parts": data.num_parts, "num_categories": data.num_classes})
    model = ReConPartSeg(cfg, seg)
    if init is not None:
        load_encoder(model, init.state)
    return model


def predict_parts(model: nn.Module, points: np.ndarray, label: np.ndarray, category_parts: list[list[int]],
                  batch: int = 32, device: torch.device | str = "cpu") -> np.ndarray:
    """Global part ids [N, P] of clouds [N, P, 3] (eval mode): the argmax over each shape's
    category parts."""
    device = torch.device(device)
    out = []
    with evaluating(model, device):
        for i in range(0, len(points), batch):
            logits = model(torch.from_numpy(np.ascontiguousarray(points[i:i + batch])).to(device),
                           torch.from_numpy(label[i:i + batch]).to(device))
            out.append(restrict_to_category(logits.float(), torch.from_numpy(label[i:i + batch]).to(device),
                                            category_parts).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, points.shape[1]), np.int64)


def evaluate_partseg(model: nn.Module, test: SegData, n_points: int, batch: int = 32,
                     device: torch.device | str = "cpu") -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(instance / class / per-category mIoU in %, predictions [N, n], the clouds scored [N, n, 3])
    on the first ``n_points`` stored points of every test shape (a store's order is random)."""
    points = np.ascontiguousarray(test.points[:, :n_points])
    pred = predict_parts(model, points, test.label, test.category_parts, batch, device)
    summary = miou_summary(shape_ious(pred, test.part[:, :n_points], test.label, test.category_parts),
                           test.label, test.class_names)
    return summary, pred, points


class PartSegTask:
    """Part segmentation for ``recon.downstream.finetune.train_task``."""

    name = "partseg"
    code = codedeps.closure(__name__)   # this module's import closure (TRAINING_CODE's and more)
    selection_key, selection_name = None, "last epoch"

    def __init__(self, p: PartSegParams, train: SegData, test: SegData | None, seed: int,
                 init: InitSource | None, device: torch.device):
        if len(train) < 2:
            raise ValueError(f"{len(train)} training shapes: need at least 2 (BatchNorm in the head)")
        if test is not None and (test.category_parts, test.num_parts) != (train.category_parts, train.num_parts):
            raise ValueError("the test shapes come with other categories or parts than the training shapes")
        self.p, self.recipe, self.seed, self.init, self.device = p, p.recipe(), seed, init, device
        self.train, self.test = train, test

    @property
    def train_size(self) -> int:
        return len(self.train)

    def dataset(self) -> SegTrainSet:
        return SegTrainSet(self.train, self.recipe.n_points, self.seed, resample=True,
                           augment=self.recipe.augment == "scale_shift")

    def build_model(self) -> ReConPartSeg:
        return build_partseg(self.p, self.train, self.init)

    def boosted(self, model: nn.Module) -> tuple[str, ...]:
        return tuple(model.lr_boost_names())

    def logits_and_targets(self, net: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        logits = net(batch["points"].to(device), batch["label"].to(device))
        return logits.reshape(-1, logits.shape[-1]), batch["part"].to(device).reshape(-1)

    def epoch_figures(self, model: nn.Module) -> dict[str, float]:
        """The test mIoU after every epoch, for the history only (the last epoch is reported)."""
        if self.test is None or not len(self.test):
            return {}
        summary, _, _ = evaluate_partseg(model, self.test, self.recipe.n_points, self.p.eval_batch, self.device)
        return {"test_instance_miou": summary["instance_miou"], "test_class_miou": summary["class_miou"]}

    def evaluate(self, model: nn.Module, out: Path | None, title: str) -> tuple[dict[str, Any], np.ndarray | None]:
        if self.test is None or not len(self.test):
            return {}, None
        summary, pred, points = evaluate_partseg(model, self.test, self.recipe.n_points, self.p.eval_batch,
                                                 self.device)
        metrics = {"test_instance_miou": summary["instance_miou"], "test_class_miou": summary["class_miou"],
                   "test_shapes": summary["shapes"], "per_category_miou": summary["per_category"]}
        if out is not None:
            shown = picture_rows(self.test.label, PICTURE_SHAPES)
            plot_parts(points[shown], pred[shown], self.test.part[shown, :self.recipe.n_points],
                       [f"{self.test.class_names[self.test.label[r]]} {self.test.ids[r]}" for r in shown],
                       out / PICTURE, max_shapes=PICTURE_SHAPES)
        return metrics, pred

    def save(self, path: Path, model: nn.Module, epoch: int) -> None:
        save_partseg_model(path, model, self.train, self.recipe, epoch)


def picture_rows(label: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` test rows for the picture: the first shape of each category first, for variety."""
    firsts = [int(np.flatnonzero(label == c)[0]) for c in np.unique(label)]
    rest = [r for r in range(len(label)) if r not in firsts]
    return np.asarray((firsts + rest)[:n], dtype=np.int64)


def finetune_partseg(p: PartSegParams, train: SegData, test: SegData | None, seed: int, out: Path | None = None,
                     d: Dist | None = None, init: InitSource | None = None, store_fingerprint: Any = None,
                     progress_factory: Callable | None = None, log=print) -> FinetuneResult:
    """Fine-tune part segmentation on ``train`` (train + val) and score the last epoch on ``test``.

    With ``out``: checkpoints (exact resume), ``history.csv`` (loss, per-point train accuracy,
    test mIoU per epoch) and, on the main rank, ``model.pt``, ``metrics.json`` and ``parts.png``.
    """
    if p.task != "partseg":
        raise ValueError(f"profile {p.profile!r} is not a part-segmentation profile")
    d = d or Dist(device=pick_device(p.device))
    task = PartSegTask(p, train, test, seed, init, d.device)
    return train_task(p, task, seed, out, d, init, store_fingerprint, progress_factory, log)


def save_partseg_model(path: Path, model: ReConPartSeg, data: SegData, recipe: Profile, epoch: int) -> None:
    """The fine-tuned network: ``{'model', 'config', 'seg', 'class_names', 'category_parts', ...}``."""
    trainstate.save_atomic(path, {
        "model": model.state_dict(), "config": trainstate.jsonable(model.cfg),
        "seg": trainstate.jsonable(model.seg), "class_names": list(data.class_names),
        "category_parts": [list(c) for c in data.category_parts], "num_parts": data.num_parts,
        "task": "partseg", "recipe": dataclasses.asdict(recipe), "epoch": epoch})


def load_partseg_model(path: str | Path, map_location: str = "cpu") -> tuple[ReConPartSeg, dict]:
    """A network saved by :func:`save_partseg_model` (``weights_only=True``), in eval mode."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    names = {f.name for f in dataclasses.fields(ReConConfig)}
    model = ReConPartSeg(ReConConfig(**{k: v for k, v in ckpt["config"].items() if k in names}),
                         PartSegConfig(**ckpt["seg"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
