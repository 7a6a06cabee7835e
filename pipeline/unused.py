"""Outputs of a stage that does not apply to this run. DVC needs every declared output to exist
after a stage's command, and the demo-only stages (the generator, its part labels, part
segmentation on them, its export) do not apply when ``index.root`` is your own mesh folder: they
then write a marked placeholder in a moment instead of failing, and the stages after them see the
mark and do the same. A folder output holds only ``NOT_USED.json``; a file output is a
placeholder its stage documents."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MARKER = "NOT_USED.json"


def mark_unused(folder: str | Path, reason: str) -> Path:
    """Make ``folder`` an empty folder holding only the marker with ``reason``."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"not_used": reason}, indent=2) + "\n")
    return folder


def unused_reason(path: str | Path) -> str | None:
    """Why the folder ``path`` is a placeholder, or None for a real output."""
    marker = Path(path) / MARKER
    return json.loads(marker.read_text())["not_used"] if marker.is_file() else None
