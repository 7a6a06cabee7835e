"""The import graph has the layers the README draws: cli -> stages -> recon -> pipeline, and inside
recon the rooms runtime -> network -> pretraining -> downstream, each importing only what its
``__init__`` docstring allows; no import circle anywhere (lazy imports inside functions count)."""

from __future__ import annotations

import ast
import re

from conftest import ROOT
from recon.runtime.codedeps import import_graph, project_modules  # the one AST import reader (dvc.yaml deps too)

#: top-level layers, highest first: each may import itself and the layers after it
LAYERS = ("cli", "stages", "recon", "pipeline")
ROOMS = ("recon.runtime", "recon.network", "recon.pretraining", "recon.downstream")


def room_of(module: str) -> str:
    for room in ROOMS:
        if module == room or module.startswith(room + "."):
            return room
    return module.split(".")[0]


def allowed_rooms(room: str) -> set[str]:
    """The rooms a recon room may import, read from its ``__init__`` docstring's "May import:"
    sentence (one fact, written once)."""
    doc = ast.get_docstring(ast.parse((ROOT / room.replace(".", "/") / "__init__.py").read_text())) or ""
    match = re.search(r"May import:(.*?)\.(\s|$)", doc, flags=re.S)
    assert match, f"{room}/__init__.py does not say what it may import"
    return {name for name in re.findall(r"``([\w.]+)``", match.group(1))}


def test_every_recon_room_says_what_lives_there_and_what_it_may_import():
    assert sorted(p.parent.name for p in (ROOT / "recon").glob("*/__init__.py")) == sorted(r.split(".")[1] for r in ROOMS)
    assert not [p.name for p in (ROOT / "recon").glob("*.py") if p.name != "__init__.py"]   # no loose modules
    for room in ROOMS:
        allowed = allowed_rooms(room)
        assert allowed <= set(ROOMS) | {"pipeline"}, (room, allowed)
        assert allowed <= set(ROOMS[:ROOMS.index(room)]) | {"pipeline"}, f"{room} may import a room above it"


def test_imports_run_downward():
    graph = import_graph()
    upward = []
    for module, targets in graph.items():
        for target in targets:
            source_layer, target_layer = module.split(".")[0], target.split(".")[0]
            if LAYERS.index(target_layer) < LAYERS.index(source_layer):
                upward.append(f"{module} -> {target}")
            source_room, target_room = room_of(module), room_of(target)
            if source_room in ROOMS and source_room != target_room and target_room != "recon":
                if target_room not in allowed_rooms(source_room):
                    upward.append(f"{module} -> {target} (not in {source_room}'s May import)")
    assert upward == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_one_file_per_name():
    """No two library modules share a file name (there were two ``partseg.py`` with different jobs).
    ``stages/`` is exempt: a stage's script is named after the stage, beside the library it wires."""
    names = [p.name for m, p in project_modules().items() if p.name != "__init__.py" and m.split(".")[0] in ("recon", "pipeline")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
