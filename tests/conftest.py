"""Test-wide settings: offline, headless, fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ["DVC_NO_ANALYTICS"] = "1"

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``../shared`` next to the clone (or $RECON_SHARED)."""
    return Path(os.environ.get("RECON_SHARED", ROOT.parent / "shared"))


@pytest.fixture
def shared() -> Path:
    return shared_dir()


@pytest.fixture
def meshes_dir() -> Path:
    path = shared_dir() / "data" / "meshes"
    if not path.is_dir():
        pytest.skip(f"real meshes not present at {path}")
    return path
