"""Training checkpoints: atomic writes, keep the last k, safe loading, RNG states for exact resume."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import torch

PATTERN = re.compile(r"epoch-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(obj: Any) -> Any:
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def save(folder: Path, epoch: int, payload: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``epoch-NNNN.pt`` atomically (temporary file, fsync, rename), then prune old ones."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{epoch:04d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    for old in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.exists():
        return []
    return sorted((p for p in folder.iterdir() if PATTERN.search(p.name)),
                  key=lambda p: int(PATTERN.search(p.name).group(1)))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def latest(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None
