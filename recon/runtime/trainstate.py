"""Training checkpoints: atomic writes, keep the last k, safe loading, RNG states for exact resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from recon.runtime import codedeps

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


def save_atomic(path: Path, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, fsync, rename: a kill never leaves a torn ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def save(folder: Path, epoch: int, payload: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``epoch-NNNN.pt`` atomically (:func:`save_atomic`), then prune old ones."""
    path = save_atomic(folder / f"epoch-{epoch:04d}.pt", payload)
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


def resume(folder: Path, identity: dict, d, log, what: str) -> dict[str, Any] | None:
    """The latest checkpoint's state when it belongs to this run (same ``identity``). A folder
    holding another run is moved to ``checkpoints.previous`` (nothing is deleted but an older
    ``.previous``) and training starts afresh."""
    path = latest(folder)
    if path is None:
        return None
    state = load(path)
    if state.get("run") == identity:
        if d.is_main:
            log(f"{what}: resuming from {path} (epoch {state['epoch'] + 1}, step {state['step']})")
        return state
    aside = folder.with_name(folder.name + ".previous")
    if d.is_main:
        log(f"[yellow]{what}: {folder} holds a run with other params, inputs or code; moved to {aside}, "
            "starting afresh[/]")
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
    d.barrier()
    return None


def code_fingerprint(*files: str) -> str:
    """sha256 over source files: a checkpoint written by other training code is another run (a
    rerun after a code change retrains instead of resuming a stale model). ``files`` are paths
    relative to the repository root, usually a module's import closure (``codedeps.closure``); a
    dotted module name stands for its own file. Sorted and deduplicated, each hashed as its
    relative path and the sha256 of its bytes, so the clone's location does not matter."""
    digest = hashlib.sha256()
    for rel in sorted({codedeps.source_file(name) for name in files}):
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256((codedeps.ROOT / rel).read_bytes()).digest())
    return digest.hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and tensor bytes (identifies initial weights)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def jsonable(obj: Any) -> Any:
    """A dataclass as JSON-native values (tuples become lists), as stored in checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def write_json(path: Path, obj: Any) -> None:
    """Write a metrics file atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def write_history(out: Path, history: list[dict]) -> None:
    """Per-epoch metrics as ``out/history.csv`` (for ``dvc plots``), rewritten atomically."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in history for k in r))
    lines = [",".join(columns)] + [",".join(_fmt(r.get(c, "")) for c in columns) for r in history]
    tmp = out / "history.csv.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "history.csv")


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
