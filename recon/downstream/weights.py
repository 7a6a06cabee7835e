"""Weights in and out of fine-tuning: the initial encoder (our checkpoints or a released
reference ``.pth``), the classifier built on it, and the fine-tuned classifier's ``model.pt``.
Everything is loaded with ``weights_only=True``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from recon.downstream.recipes import FinetuneParams, Profile
from recon.network.model import ReConClassifier, ReConConfig
from recon.network.reference import (
    config_from_state_dict,
    detect_kind,
    init_classifier_from_pretrain,
    reference_to_ours,
    strip_prefix,
)
from recon.runtime import trainstate


@dataclass
class InitSource:
    """Encoder weights (our names) and the architecture they came with."""

    state: dict[str, torch.Tensor]
    config: dict | None
    source: str
    target_stats: dict | None = None   # recon.pretraining.targets.TargetStats.state() of a run with standardised targets


def load_init(path: str | None) -> InitSource | None:
    """Weights to start from: our ``model.pt`` / epoch checkpoint (``{'model', 'config'}``), a
    released reference ``.pth`` (``{'base_model'}``, renamed via recon.network.reference), or None for
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
                            head=p.protocol)
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
