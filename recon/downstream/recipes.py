"""Fine-tuning recipes: the dataset profiles of the paper and the reference configs, and the
parameters of a fine-tuning run (``finetune`` and ``partseg`` sections of params.yaml). Plain
data, no training code, so data loading, inference, weights and both loops read it without
importing each other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline import layout
from recon.runtime.optim import SCHEDULES

AUGMENTATIONS = ("none", "rotate", "scale", "scale_translate")   # classification training / voting passes


PROTOCOLS = ("full", "mlp3", "linear")   # ReConClassifier head kinds


@dataclass(frozen=True)
class Profile:
    """A dataset recipe: the paper's fine-tuning recipes (AdamW, wd 0.05, cosine, 10 warm-up epochs,
    300 epochs, batch 32, drop path 0.2; ScanObjectNN lr 2e-5 at 2,048 points, ModelNet40 lr 1e-5 at
    1,024), few-shot from the reference config (``PROFILES`` below)."""

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
_SCANOBJECTNN = Profile(n_points=2048, num_group=128, group_size=32, lr=2e-5, epochs=300, warmup_epochs=10,
                        batch_size=32, drop_path=0.2, augment="rotate", vote_augment="none", normalize=False)
PROFILES: dict[str, Profile] = {
    "scanobjectnn": dataclasses.replace(_SCANOBJECTNN, vote_augment="rotate"),  # = scanobjectnn-hardest
    "scanobjectnn-hardest": dataclasses.replace(_SCANOBJECTNN, vote_augment="rotate"),   # PB_T50_RS
    "scanobjectnn-objbg": _SCANOBJECTNN,
    "scanobjectnn-objonly": _SCANOBJECTNN,
    "modelnet40": Profile(n_points=1024, num_group=64, group_size=32, lr=1e-5, epochs=300, warmup_epochs=10,
                          batch_size=32, drop_path=0.2, augment="scale_translate", vote_augment="scale", normalize=True),
    "modelnet40-8k": Profile(n_points=8192, num_group=512, group_size=32, lr=1e-5, epochs=300, warmup_epochs=10,
                             batch_size=32, drop_path=0.2, augment="scale_translate", vote_augment="scale", normalize=True),
    # reference cfgs/full/fewshot.yaml: lr 5e-4, 150 epochs, drop path 0.1; its runner rotates
    # (the few-shot dataset is not named "ModelNet", so it gets the non-ModelNet augmentation)
    "fewshot": Profile(n_points=1024, num_group=64, group_size=32, lr=5e-4, epochs=150, warmup_epochs=10,
                       batch_size=32, drop_path=0.1, augment="rotate", vote_augment="none", normalize=True),
    # the embedded demo: a short, larger-lr schedule stepped per optimiser step (not a paper recipe)
    "demo": Profile(n_points=1024, num_group=64, group_size=32, lr=2e-4, epochs=20, warmup_epochs=2,
                    batch_size=16, drop_path=0.2, augment="scale_translate", vote_augment="scale", normalize=True, schedule="step"),
}
#: part segmentation (``recon/downstream/partseg_finetune.py``): the reference's ShapeNetPart recipe (batch 16,
#: 300 epochs, lr 1e-4 with the new layers at 10x, 10 warm-up epochs, 2,048 points, 128 groups of
#: 32, drop path 0.1, no voting), and the demo's, small enough for a minute on two CPU cores
PARTSEG_PROFILES: dict[str, Profile] = {
    "shapenetpart": Profile(n_points=2048, num_group=128, group_size=32, lr=1e-4, epochs=300, warmup_epochs=10,
                            batch_size=16, drop_path=0.1, augment="scale_shift", vote_augment="none", normalize=False),
    "demo-partseg": Profile(n_points=256, num_group=16, group_size=32, lr=1e-3, epochs=5, warmup_epochs=1,
                            batch_size=16, drop_path=0.1, augment="scale_shift", vote_augment="none", normalize=False, schedule="step"),
}
SEG_AUGMENTATIONS = ("none", "scale_shift")   # scale_shift: recon.downstream.partseg_data.scale_and_translate
#: the ScanObjectNN variant (``pipeline/convert.py``) each ScanObjectNN profile is the recipe for
SCANOBJECTNN_VARIANTS = {"scanobjectnn": "PB_T50_RS", "scanobjectnn-hardest": "PB_T50_RS",
                         "scanobjectnn-objbg": "OBJ_BG", "scanobjectnn-objonly": "OBJ_ONLY"}


@dataclass
class FinetuneParams:
    #: the dataset recipe: scanobjectnn(-hardest) | scanobjectnn-objbg | scanobjectnn-objonly | modelnet40 |
    #: modelnet40-8k | fewshot | demo
    profile: str = "demo"
    store: str = layout.default(layout.DEMO_STORE)  # the downstream store (train + test splits)
    init: str = layout.default(layout.PRETRAINED)  # our model.pt / epoch checkpoint, a reference .pth, or "scratch"
    variant: str = "tiny"                    # architecture when init is "scratch"
    model: dict = field(default_factory=dict)  # ReConConfig overrides
    protocol: str = "full"                   # full | mlp3 | linear
    # None, down to schedule: the profile's value
    n_points: int | None = None              # points per cloud; None: the profile's
    num_group: int | None = None             # groups (patches) per cloud; None: the profile's
    group_size: int | None = None            # points per group; None: the profile's
    lr: float | None = None                  # peak learning rate (AdamW, cosine); None: the profile's
    epochs: int | None = None                # training epochs; None: the profile's
    warmup_epochs: int | None = None         # linear warm-up from warmup_lr to lr; None: the profile's
    batch_size: int | None = None            # clouds per optimiser step; None: the profile's
    drop_path: float | None = None           # stochastic depth rate; None: the profile's
    #: training augmentation: none | rotate | scale | scale_translate (partseg: none | scale_shift); None: the profile's
    augment: str | None = None
    vote_augment: str | None = None          # augmentation of the voting passes; None: the profile's
    normalize: bool | None = None            # centre + unit sphere before sampling; None: the profile's
    schedule: str | None = None              # learning rate per epoch (the reference) | per step; None: the profile's
    weight_decay: float = 0.05               # AdamW weight decay
    min_lr: float = 1e-6                     # the cosine's floor
    warmup_lr: float = 1e-6                  # the warm-up's start
    head_lr_scale: float = 10.0              # lr multiplier of the new layers (head + cls token; part seg: label, propagation, head)
    grad_clip: float = 10.0                  # gradient norm clip; 0: none
    votes: int = 10                          # voting passes at test time (0: no voting)
    val_fraction: float = 0.0                # > 0: select the epoch by accuracy on a validation split
    seed: int = 0                            # initialisation, order and augmentation
    seeds: list[int] | None = None           # a sweep: mean ± std over these seeds
    eval_batch: int = 64                     # clouds per evaluation forward
    loader_workers: int = 0                  # DataLoader processes
    device: str = "auto"                     # auto | cpu | cuda[:i]
    keep_last: int = 2                       # epoch checkpoints kept (resume from the newest)
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


@dataclass
class PartSegParams(FinetuneParams):
    """``FinetuneParams`` with part-segmentation defaults (the demo's parts store and recipe), plus
    ``seg``: only part segmentation has a segmentation head to configure."""

    profile: str = "demo-partseg"            # the recipe: shapenetpart (the reference) | demo-partseg
    store: str = layout.default(layout.DEMO_PARTS_STORE)  # the part-segmentation store (train, val, test)
    seg: dict = field(default_factory=dict)  # PartSegConfig overrides (the segmentation head); {}: the reference's
    votes: int = 0                           # no voting in part segmentation

