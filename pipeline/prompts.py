"""Text-teacher prompt templates: the reference's 20 prefixes x 3 suffixes = 60 per category (the
embed stage encodes all 60; pretraining draws one per step, zero-shot sums them per category).

A prompt is ``prefix + name + suffix``, where ``name`` is the category's own text when a
descriptions file gives one (keyed by category name or by ShapeNet synset id, as the reference's
description records are), otherwise the category name as words (`readable_name`: folder names
such as ``NonWheelChair`` or ``Musical_Instrument`` become "non wheel chair", "musical
instrument"; ShapeNet's taxonomy names are words already). Templates are ordered prefix-major:
``templates()[p * len(SUFFIXES) + s] == PREFIXES[p] + "{}" + SUFFIXES[s]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREFIXES: tuple[str, ...] = (
    "", "A ", "A model of ", "A model of a ", "An image of ", "An image of a ",
    "A 3D model of ", "A 3D model of a ", "A rendering model of ", "A rendering model of a ",
    "A point cloud of ", "A point cloud of a ", "A point cloud model of ",
    "A point cloud model of a ", "A 3D rendering model of ", "A 3D rendering model of a ",
    "A rendering image of ", "A rendering image of a ", "A 3D rendering image of ",
    "A 3D rendering image of a ",
)
SUFFIXES: tuple[str, ...] = (".", " with white background.", " with black context.")


def templates() -> list[str]:
    """The 60 templates, each with one ``{}`` placeholder, prefix-major."""
    return [p + "{}" + s for p in PREFIXES for s in SUFFIXES]


_WORD_BREAKS = re.compile(r"(?<=[a-z0-9])(?=[A-Z])"          # camelCase / PascalCase
                          r"|(?<=[A-Z])(?=[A-Z][a-z])"       # an acronym before a word: RCCar
                          r"|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")


def readable_name(category: str) -> str:
    """A category or folder name as the words a text teacher reads: underscores and case changes
    become spaces, lower case ('NonWheelChair' -> 'non wheel chair', 'Musical_Instrument' ->
    'musical instrument', 'airplane' and 'trash can' unchanged)."""
    words = _WORD_BREAKS.sub(" ", re.sub(r"[_\s]+", " ", category)).split()
    return " ".join(words).lower() or category


def prompts_for(category: str, descriptions: Mapping[str, str] | None = None) -> list[str]:
    """The 60 prompts for a category; its description (if given) replaces its readable name."""
    name = descriptions.get(category, readable_name(category)) if descriptions else readable_name(category)
    return [t.format(name) for t in templates()]


def category_texts(categories: list[str], synsets: list[str], descriptions: Mapping[str, str],
                   source: str = "descriptions") -> list[str]:
    """The text of each category: its description looked up by name, then by synset id, else its
    `readable_name`. A non-empty ``descriptions`` that matches no category at all is an error (a
    file for another dataset, or keys in another form, would otherwise be silently ignored)."""
    if len(categories) != len(synsets):
        raise ValueError("one synset id per category is needed (use '' when there is none)")
    texts, matched = [], set()
    for name, synset in zip(categories, synsets):
        key = name if name in descriptions else synset if synset and synset in descriptions else None
        texts.append(descriptions[key] if key is not None else readable_name(name))
        if key is not None:
            matched.add(key)
    if descriptions and not matched:
        keys = sorted(descriptions)
        raise ValueError(f"{source}: none of its {len(keys)} keys ({', '.join(keys[:5])}"
                         f"{' ...' if len(keys) > 5 else ''}) names a category or synset id of this dataset "
                         f"(categories {', '.join(categories[:5])}{' ...' if len(categories) > 5 else ''}; "
                         f"synsets {', '.join(s for s in synsets[:5] if s) or 'none'})")
    return texts


def _records_to_mapping(records: list[Any]) -> dict[str, str]:
    """Reference-style records [{'catalogue': 2691156, 'describe': '...'}, ...] -> mapping."""
    out: dict[str, str] = {}
    for r in records:
        if not (isinstance(r, Mapping) and "catalogue" in r and "describe" in r):
            raise ValueError("description records need 'catalogue' and 'describe' keys")
        key = r["catalogue"]
        out[f"{key:08d}" if isinstance(key, int) else str(key)] = r["describe"]  # ShapeNet synset ids
    return out


def load_descriptions(path: str | Path) -> dict[str, str]:
    """Read category -> text from JSON or YAML (.yaml/.yml); also accepts reference-style records."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, list):
        data = _records_to_mapping(data)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping category -> text")
    out = {str(k): v for k, v in data.items()}
    bad = [k for k, v in out.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"{path}: descriptions must be non-empty strings (bad: {bad[:5]})")
    return out
