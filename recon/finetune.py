"""Fine-tuning ReCon classifiers on a classification store (``pipeline/convert.py`` layout).

Protocols: ``full`` (everything trains), ``mlp3`` / ``linear`` (only the head and the [CLS]
token/position train; the backbone is frozen, its BatchNorm statistics too). Dataset profiles carry
the SPEC recipes; any field can be overridden. The recipe: AdamW (wd 0.05, none on 1-D/bias/tokens),
warm-up + cosine per epoch as the reference (per step: ``schedule: step``, the demo's), head and
[CLS] at 10x lr, grad-norm clip 10, drop path 0.2.

Sampling follows the reference runner: every cloud (normalised first when the profile says so)
is reduced once to an FPS superset (1200 points for 1024, 2400 for 2048, 4800 for 4096, all for
8192, capped by what is stored); training draws a random ``n_points`` subset of it each step;
the single-pass evaluation uses the first ``n_points`` FPS points (= FPS to ``n_points``); voting
averages the logits of ``votes`` passes over random subsets with the profile's test augmentation.
Every random draw is seeded by (seed, epoch, row), so a resumed run continues exactly.

Honest reporting: the reported model is the last epoch, or the epoch of best accuracy on a
validation split carved from the training split (``val_fraction``); the test split is looked
at once, after training. A ``seeds`` sweep reports mean ± std (ddof 0) over the seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from pipeline.store import open_store
from recon import trainstate
from recon.checkpoint import (
    config_from_state_dict,
    detect_kind,
    init_classifier_from_pretrain,
    reference_to_ours,
    strip_prefix,
)
from recon.data import normalize, rotate_up
from recon.distributed import Dist, pick_device
from recon.model import ReConClassifier, ReConConfig
from recon.optim import SCHEDULES, Schedule, adamw, set_lr
from recon.pointops import farthest_point_sample

PROTOCOL_HEADS = {"full": "full", "mlp3": "mlp3", "linear": "linear"}
BOOSTED = ("head.", "encoder.cls_token", "encoder.cls_pos")
SUPERSET = {1024: 1200, 2048: 2400, 4096: 4800, 8192: 8192}
AUGMENTATIONS = ("none", "rotate", "scale", "scale_translate")


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
#: the ScanObjectNN variant (``pipeline/convert.py``) each ScanObjectNN profile is the recipe for
SCANOBJECTNN_VARIANTS = {"scanobjectnn": "PB_T50_RS", "scanobjectnn-hardest": "PB_T50_RS",
                         "scanobjectnn-objbg": "OBJ_BG", "scanobjectnn-objonly": "OBJ_ONLY"}


@dataclass
class FinetuneParams:
    profile: str = "demo"
    store: str = "cache/downstream/demo.zarr"
    init: str = "cache/pretrain/model.pt"   # our model.pt / epoch checkpoint, a reference .pth, or "scratch"
    variant: str = "tiny"                    # architecture when init is "scratch"
    model: dict = field(default_factory=dict)  # ReConConfig overrides
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

    def recipe(self) -> Profile:
        """The profile with this run's overrides applied."""
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; choose from {list(PROFILES)}")
        if self.protocol not in PROTOCOL_HEADS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose from {list(PROTOCOL_HEADS)}")
        base = PROFILES[self.profile]
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(Profile)
                   if getattr(self, f.name) is not None}
        recipe = dataclasses.replace(base, **changes)
        for kind in (recipe.augment, recipe.vote_augment):
            if kind not in AUGMENTATIONS:
                raise ValueError(f"unknown augmentation {kind!r}; choose from {AUGMENTATIONS}")
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


# ----------------------------------------------------------------------------- data


@dataclass
class ClsData:
    """Usable rows of a classification store (or a part of it)."""

    points: np.ndarray          # [N, P, 3] float32
    labels: np.ndarray          # [N] int64
    ids: np.ndarray             # [N] str
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> ClsData:
        rows = np.asarray(rows, dtype=np.int64)
        return ClsData(self.points[rows], self.labels[rows], self.ids[rows], self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_classification(path: str | Path, split: str | None = None) -> ClsData:
    """Ok rows of a classification store, optionally of one split; raises StoreError when the
    store is not one."""
    store = open_store(path, expect_arrays={"points": (-1, 3), "label": (), "split": ()})
    keep = store.ok.copy()
    splits = list(store.params.get("splits", []))
    if split is not None:
        if split not in splits:
            raise ValueError(f"{path} has no split {split!r} (splits: {splits})")
        keep &= np.asarray(store["split"][:]) == splits.index(split)
    rows = np.flatnonzero(keep)
    points = np.asarray(store["points"][:], dtype=np.float32)[rows] if rows.size else \
        np.zeros((0, *store["points"].shape[1:]), np.float32)
    labels = np.asarray(store["label"][:], dtype=np.int64)[rows]
    return ClsData(points, labels, store.ids[rows], list(store.params["class_names"]))


def superset_size(n_points: int, available: int) -> int:
    """Size of the FPS superset training subsets are drawn from (reference runner), capped."""
    return min(SUPERSET.get(n_points, math.ceil(n_points * 1.171875)), available)


def fps_order(points: np.ndarray, k: int, device: str | torch.device = "cpu", batch: int = 64) -> np.ndarray:
    """The first ``k`` farthest-point-sampled points of every cloud, in FPS order [N, k, 3].

    With ``k`` equal to the stored count the clouds are returned as they are: FPS from index 0
    picks the same groups whatever the order of the other points.
    """
    if k >= points.shape[1]:
        return np.ascontiguousarray(points, dtype=np.float32)
    out = np.empty((points.shape[0], k, 3), dtype=np.float32)
    for i in range(0, len(points), batch):
        xyz = torch.from_numpy(np.ascontiguousarray(points[i:i + batch], dtype=np.float32)).to(device)
        idx = farthest_point_sample(xyz, k)
        out[i:i + batch] = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3)).cpu().numpy()
    return out


def prepare(data: ClsData, recipe: Profile, device: str | torch.device = "cpu") -> np.ndarray:
    """Normalise (when the recipe says so) and reduce to the FPS superset [N, S, 3]."""
    pts = data.points
    if recipe.normalize:
        pts = np.stack([normalize(c) for c in pts]).astype(np.float32) if len(pts) else pts
    return fps_order(pts, superset_size(recipe.n_points, pts.shape[1]), device)


def eval_clouds(data: ClsData, n_points: int, normalize_first: bool = True,
                device: str | torch.device = "cpu") -> np.ndarray:
    """Deterministic evaluation inputs: (normalised) clouds reduced by FPS to ``n_points``."""
    pts = data.points
    if normalize_first and len(pts):
        pts = np.stack([normalize(c) for c in pts]).astype(np.float32)
    return fps_order(pts, min(n_points, pts.shape[1]), device)


def augment(points: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``rotate`` (about Y), ``scale`` (U(2/3, 3/2) per axis), ``scale_translate`` (+ U(-0.2, 0.2))."""
    if kind == "rotate":
        return rotate_up(points, rng.uniform(0.0, 2.0 * math.pi)).astype(np.float32)
    if kind == "scale":
        return (points * rng.uniform(2 / 3, 3 / 2, 3)).astype(np.float32)
    if kind == "scale_translate":
        return (points * rng.uniform(2 / 3, 3 / 2, 3) + rng.uniform(-0.2, 0.2, 3)).astype(np.float32)
    return points


def random_view(cloud: np.ndarray, n_points: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A random ``n_points`` subset of the superset (random order), augmented."""
    pick = rng.choice(cloud.shape[0], n_points, replace=False)
    return augment(cloud[pick], kind, rng)


class TrainSet(Dataset):
    """Items: a random, augmented subset of a superset cloud; draws seeded by (seed, epoch, row)."""

    def __init__(self, superset: np.ndarray, labels: np.ndarray, n_points: int, kind: str, seed: int):
        self.superset, self.labels, self.n_points, self.kind, self.seed = superset, labels, n_points, kind, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pts = random_view(self.superset[index], self.n_points, self.kind, rng)
        return {"points": torch.from_numpy(np.ascontiguousarray(pts)), "label": torch.tensor(int(self.labels[index]))}


def vote_views(superset: np.ndarray, n_points: int, votes: int, kind: str, seed: int) -> Iterator[np.ndarray]:
    """The ``votes`` augmented inputs [N, n_points, 3] that voting averages over."""
    for v in range(votes):
        yield np.stack([random_view(c, n_points, kind, np.random.default_rng([seed, 1_000_003, v, i]))
                        for i, c in enumerate(superset)]).astype(np.float32)


# ----------------------------------------------------------------------------- model


@dataclass
class InitSource:
    """Encoder weights (our names) and the architecture they came with."""

    state: dict[str, torch.Tensor]
    config: dict | None
    source: str
    target_stats: dict | None = None   # recon.targets.TargetStats.state() of a run with standardised targets


def load_init(path: str | None) -> InitSource | None:
    """Weights to start from: our ``model.pt`` / epoch checkpoint (``{'model', 'config'}``), a
    released reference ``.pth`` (``{'base_model'}``, renamed via recon.checkpoint), or None for
    ``scratch``. Loaded with ``weights_only=True``."""
    if path in (None, "", "scratch"):
        return None
    if not Path(path).exists():
        raise FileNotFoundError(f"init checkpoint {path} not found (use init: scratch to train from scratch)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "base_model" in ckpt:
        sd = strip_prefix(ckpt["base_model"])
        ours = reference_to_ours(sd, detect_kind(sd))
        return InitSource(ours, config_from_state_dict(ours), f"reference:{path}")
    if isinstance(ckpt, dict) and "model" in ckpt:
        ours = strip_prefix(ckpt["model"])
        return InitSource(ours, ckpt.get("config") or config_from_state_dict(ours), str(path), ckpt.get("target_stats"))
    sd = strip_prefix(ckpt)
    if any(k.startswith("encoder.") for k in sd):
        return InitSource(sd, config_from_state_dict(sd), str(path))
    ours = reference_to_ours(sd, detect_kind(sd))
    return InitSource(ours, config_from_state_dict(ours), f"reference:{path}")


def classifier_config(init: InitSource | None, variant: str, overrides: dict, recipe: Profile) -> ReConConfig:
    names = {f.name for f in dataclasses.fields(ReConConfig)}
    base = {k: v for k, v in (init.config or {}).items() if k in names} if init else {}
    cfg = ReConConfig(**base) if init else ReConConfig.variant(variant)
    return cfg.replace(**{**overrides, "num_group": recipe.num_group, "group_size": recipe.group_size,
                          "drop_path_rate": recipe.drop_path})


def build_classifier(p: FinetuneParams, num_classes: int, init: InitSource | None = None,
                     recipe: Profile | None = None) -> ReConClassifier:
    """The classifier for ``p.protocol``, its encoder loaded from ``init``; frozen when asked."""
    recipe = recipe or p.recipe()
    model = ReConClassifier(classifier_config(init, p.variant, p.model, recipe), num_classes,
                            head=PROTOCOL_HEADS[p.protocol])
    if init is not None:
        model.reset_head_default()  # the reference's head keeps PyTorch's init under a checkpoint
        missing, _ = init_classifier_from_pretrain(model, init.state)
        missing = [k for k in missing if k.startswith("encoder.")]
        if missing:
            raise ValueError(f"{init.source} lacks encoder weights {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
    if p.protocol != "full":
        model.freeze_backbone(True)
    return model


# ----------------------------------------------------------------------------- evaluation


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, clouds: np.ndarray, batch: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Logits [N, C] of clouds [N, n, 3] in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    with autocast_for(device):
        for i in range(0, len(clouds), batch):
            out.append(model(torch.from_numpy(clouds[i:i + batch]).to(device)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def vote_logits(model: torch.nn.Module, superset: np.ndarray, n_points: int, votes: int, kind: str,
                seed: int, batch: int = 64, device: torch.device | str = "cpu") -> np.ndarray:
    """Mean of the logits over ``votes`` augmented passes (``vote_views``)."""
    total = None
    for view in vote_views(superset, n_points, votes, kind, seed):
        logits = predict_logits(model, view, batch, device)
        total = logits if total is None else total + logits
    return total / votes


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = actual class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Accuracy (%) of every class present in ``labels``."""
    return {class_names[c]: float((pred[labels == c] == c).mean() * 100)
            for c in range(len(class_names)) if (labels == c).any()}


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean() * 100) if len(labels) else math.nan


def write_confusion(out: Path, pred: np.ndarray, labels: np.ndarray, class_names: list[str],
                    title: str = "") -> None:
    """``confusion.csv`` (one ``actual,predicted`` row per shape: the input of dvc's confusion
    template) and ``confusion.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = ["actual,predicted"] + [f"{class_names[a]},{class_names[b]}" for a, b in zip(labels, pred)]
    tmp = out / "confusion.csv.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "confusion.csv")
    cm = confusion_matrix(pred, labels, len(class_names))
    k = len(class_names)
    side = min(max(4.5, 2 + 0.3 * k), 16)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=6 if k > 20 else 8)
    ax.set_yticks(range(k), class_names, fontsize=6 if k > 20 else 8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if k <= 20:
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > cm.max() / 2 else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)


def evaluate_classifier(model: torch.nn.Module, test: ClsData, recipe: Profile, votes: int, seed: int,
                        batch: int = 64, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Single-pass and voted accuracy, per-class accuracy and predictions on ``test``."""
    superset = prepare(test, recipe, device)
    single = predict_logits(model, np.ascontiguousarray(superset[:, :recipe.n_points]), batch, device)
    pred = single.argmax(1)
    result = {"test_acc": accuracy(pred, test.labels), "test_shapes": len(test)}
    if votes > 0:
        voted = vote_logits(model, superset, recipe.n_points, votes, recipe.vote_augment, seed, batch, device)
        result["test_vote_acc"] = accuracy(voted.argmax(1), test.labels)
        result["votes"] = votes
    per_class = per_class_accuracy(pred, test.labels, test.class_names)
    result["mean_class_acc"] = float(np.mean(list(per_class.values()))) if per_class else math.nan
    result["per_class_acc"] = per_class
    return result | {"_pred": pred}


# ----------------------------------------------------------------------------- training


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): ``fraction`` of each class (at least one where a class has
    two or more shapes), seeded."""
    rng = np.random.default_rng([seed, 7])
    val = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = round(fraction * len(rows))
        n = min(max(n, 1 if len(rows) >= 2 else 0), len(rows) - 1)
        val.extend(rows[:n].tolist())
    val_rows = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(labels)), val_rows), val_rows


@dataclass
class FinetuneResult:
    model: ReConClassifier
    metrics: dict[str, Any]
    history: list[dict]
    pred: np.ndarray | None = None


#: the modules whose source decides what fine-tuning computes (dvc.yaml lists them as deps too)
TRAINING_CODE = ("recon.model", "recon.pointops", "recon.data", "recon.optim", "recon.checkpoint", "recon.finetune")


def run_identity(p: FinetuneParams, seed: int, store_fingerprint: Any, init: InitSource | None = None) -> dict:
    """What a resumed run must share with its checkpoint: params, seed, data, the initial
    weights themselves (a re-pretrained ``model.pt`` at the same path is another run) and the
    training code."""
    params = {k: v for k, v in trainstate.jsonable(p).items() if k not in RUNTIME_ONLY}
    return {"params": params, "seed": seed, "store": store_fingerprint,
            "init": trainstate.state_digest(init.state) if init is not None else "scratch",
            "code": trainstate.code_fingerprint(*TRAINING_CODE)}


def finetune(p: FinetuneParams, train: ClsData, test: ClsData | None, seed: int, out: Path | None = None,
             d: Dist | None = None, init: InitSource | None = None, store_fingerprint: Any = None,
             progress_factory: Callable | None = None, log=print) -> FinetuneResult:
    """Fine-tune on ``train`` and evaluate the selected model once on ``test``.

    With ``out``: per-epoch atomic checkpoints in ``out/checkpoints`` (exact resume), ``history.csv``,
    and, on the main rank, ``model.pt``, ``metrics.json``, ``confusion.csv`` / ``confusion.png``.
    """
    d = d or Dist(device=pick_device(p.device))
    recipe = p.recipe()
    device = d.device
    torch.manual_seed(seed + d.rank)
    val = None
    if p.val_fraction > 0:
        tr_rows, val_rows = stratified_split(train.labels, p.val_fraction, seed)
        train, val = train.subset(tr_rows), train.subset(val_rows)
    if len(train) < 2:
        raise ValueError(f"{len(train)} training shapes: need at least 2 (BatchNorm in the head)")
    superset = prepare(train, recipe, device)
    val_superset = prepare(val, recipe, device)[:, :recipe.n_points] if val is not None and len(val) else None
    dataset = TrainSet(superset, train.labels, recipe.n_points, recipe.augment, seed)
    micro = max(2, min(recipe.batch_size // d.world, len(dataset) // d.world))
    steps_per_epoch = len(dataset) // (micro * d.world)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training shapes is fewer than one batch on {d.world} processes")
    model = build_classifier(p, train.num_classes, init, recipe).to(device)
    optimizer = adamw(model, p.weight_decay, recipe.lr, BOOSTED, p.head_lr_scale)
    identity = run_identity(p, seed, store_fingerprint, init)
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
            points, labels = batch["points"].to(device), batch["label"].to(device)
            with autocast:
                logits = net(points)
            loss = F.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, p.grad_clip)
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
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
        if val_superset is not None:
            record["val_acc"] = accuracy(predict_logits(model, val_superset, p.eval_batch, device).argmax(1), val.labels)
            if best is None or record["val_acc"] > best["val_acc"]:
                best = {"epoch": epoch, "val_acc": record["val_acc"],
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
        selection, selected_epoch = "best validation accuracy", best["epoch"]
    metrics: dict[str, Any] = {"seed": seed, "protocol": p.protocol, "profile": p.profile,
                               "selection": selection, "selected_epoch": selected_epoch,
                               "epochs": len(history), "train_shapes": len(train)}
    if best is not None:
        metrics["val_acc"] = best["val_acc"]
        metrics["val_shapes"] = len(val)
    pred = None
    if d.is_main and test is not None and len(test):
        result = evaluate_classifier(model, test, recipe, p.votes, seed, p.eval_batch, device)
        pred = result.pop("_pred")
        metrics.update(result)
        if out is not None:
            write_confusion(out, pred, test.labels, test.class_names,
                            f"{p.profile} {p.protocol} seed {seed}: {metrics['test_acc']:.2f}% (single pass)")
    if d.is_main and out is not None:
        save_model(out / "model.pt", model, train.class_names, p, recipe, selected_epoch)
        trainstate.write_json(out / "metrics.json", metrics)
    return FinetuneResult(model, metrics, history, pred)


def save_model(path: Path, model: ReConClassifier, class_names: list[str], p: FinetuneParams,
               recipe: Profile, epoch: int) -> None:
    """The fine-tuned classifier: ``{'model', 'config', 'class_names', 'head', 'recipe', ...}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"model": model.state_dict(), "config": trainstate.jsonable(model.cfg), "class_names": list(class_names),
                "head": model.head_kind, "protocol": p.protocol, "recipe": dataclasses.asdict(recipe),
                "epoch": epoch}, tmp)
    tmp.replace(path)


def load_finetuned(path: str | Path, map_location: str = "cpu") -> tuple[ReConClassifier, dict]:
    """A classifier saved by :func:`save_model` (``weights_only=True``), in eval mode."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    names = {f.name for f in dataclasses.fields(ReConConfig)}
    cfg = ReConConfig(**{k: v for k, v in ckpt["config"].items() if k in names})
    model = ReConClassifier(cfg, len(ckpt["class_names"]), head=ckpt["head"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def summarise_seeds(per_seed: list[dict]) -> dict[str, Any]:
    """mean ± std (ddof 0) of the accuracies over seeds, with every seed's numbers."""
    summary: dict[str, Any] = {"seeds": [m["seed"] for m in per_seed]}
    for key in ("test_acc", "test_vote_acc", "mean_class_acc", "val_acc"):
        values = [m[key] for m in per_seed if key in m]
        if values:
            summary[f"{key}_mean"] = float(np.mean(values))
            summary[f"{key}_std"] = float(np.std(values))
    summary["per_seed"] = [{k: v for k, v in m.items() if k != "per_class_acc"} for m in per_seed]
    return summary
