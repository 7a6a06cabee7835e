"""Which repository files a module's code depends on: the one list behind every stage's code
``deps`` in ``dvc.yaml`` and behind the code fingerprints that decide whether a checkpoint may be
resumed (``trainstate.code_fingerprint``).

The list is the module's *import closure* inside this project (``cli.py``, ``stages/``,
``recon/``, ``pipeline/``), read from the source with :mod:`ast` (nothing is imported): every
``import`` anywhere in a file counts, lazy ones inside functions included; ``from pkg import mod``
counts as the module ``pkg.mod`` when that is one (else as ``pkg``); relative imports are resolved;
and the ``__init__.py`` of every package on the way is in (importing ``a.b.c`` runs ``a`` and
``a.b`` first). Files are named relative to the repository root, ``/``-separated, sorted. This
module itself is never listed (:data:`SELF`).

A ``dvc.yaml`` stage's code is the closure of the modules its ``cmd`` runs: for ``recon <command>``
the project modules that command's function in ``cli.py`` imports (e.g. ``stages.pretrain``);
for ``python -m <module>`` that module. ``cli.py`` itself is left out on purpose: it only turns
options into params overrides, and listing it would rerun every stage after any help-text edit.

    python -m recon.runtime.codedeps --check    # exit 1 and print the diff when dvc.yaml drifted
    python -m recon.runtime.codedeps --write    # rewrite the code entries of the deps: blocks
    python -m recon.runtime.codedeps --module recon.pretraining.trainer   # print one closure

``--write`` touches only the code entries (project ``.py`` files) of each stage's ``deps:`` list:
data deps, comments and every other line stay as they are; the code entries follow the data deps,
sorted.

Standard library only (``recon.runtime`` may import torch, numpy and the standard library).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import shlex
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

#: the repository root (this file is recon/runtime/codedeps.py)
ROOT = Path(__file__).resolve().parents[2]
#: the project's top-level modules and packages: everything else is a third-party import
PACKAGES = ("cli", "stages", "recon", "pipeline")
#: the programs a dvc.yaml ``cmd`` may start project code with (``[project.scripts]`` in pyproject.toml)
SCRIPTS = {"recon": "cli"}
#: files a stage's code deps never list (see the module docstring)
NOT_DEPS = ("cli.py",)
#: this module: it decides which files are listed, never what a stage computes, so no closure
#: lists it (else a change to the dvc.yaml writer would invalidate every training checkpoint);
#: a change to it that changes a list shows up as that list's change
SELF = "recon.runtime.codedeps"

#: the repository's dvc.yaml files: the demo pipeline and the studies' (not run by the root `dvc repro`)
PIPELINES = ("dvc.yaml", "stages/studies/dvc.yaml")


# ----------------------------------------------------------------------------- the import graph


def _root(root: Path | None) -> Path:
    """``root``, or the repository's (looked up at call time, so a test may point :data:`ROOT` elsewhere)."""
    return Path(ROOT if root is None else root).resolve()


def module_name(path: Path, root: Path | None = None) -> str:
    """``recon/runtime/optim.py`` -> ``recon.runtime.optim``; a package's ``__init__.py`` -> the package."""
    parts = Path(path).resolve().relative_to(_root(root)).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path | None = None) -> dict[str, Path]:
    """Every project module by name: ``cli`` and the ``.py`` files under ``stages/``, ``recon/``, ``pipeline/``."""
    root = _root(root)
    files = [root / f"{PACKAGES[0]}.py"] if (root / f"{PACKAGES[0]}.py").exists() else []
    files += sorted(p for pkg in PACKAGES[1:] if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))
    return {module_name(p, root): p for p in files}


def is_package(path: Path) -> bool:
    return Path(path).name == "__init__.py"


@lru_cache(maxsize=4096)
def _parsed_imports(path: str, mtime_ns: int, size: int) -> tuple[tuple[int, str | None, tuple[str, ...]], ...]:
    """(level, module, names) of every import statement in a file; cached per file version."""
    found = []
    for node in ast.walk(ast.parse(Path(path).read_bytes(), filename=path)):
        if isinstance(node, ast.Import):
            found.extend((0, a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, tuple(a.name for a in node.names)))
    return tuple(found)


def imports_of(path: Path, modules: dict[str, Path], root: Path | None = None) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body, lazy imports included
    (``from a import b`` counts as ``a.b`` when that is a module, else ``a``; ``import a.b`` as
    ``a.b``). Parent packages are not added here (:func:`closure` adds them)."""
    path, root = Path(path), _root(root)
    stat = path.stat()
    here = module_name(path, root).split(".")
    package = here if is_package(path) else here[:-1]
    found: set[str] = set()
    for level, module, names in _parsed_imports(str(path), stat.st_mtime_ns, stat.st_size):
        if not names:                      # import a.b.c
            found.add(module)
            continue
        if level:                          # from .x import y: relative to this module's package
            base = package[:len(package) - level + 1] if level <= len(package) else None
            if base is None:
                continue
            module = ".".join(base + ([module] if module else []))
        for name in names:
            sub = f"{module}.{name}"
            found.add(sub if sub in modules else module)
    return {m for m in found if m in modules}


def import_graph(root: Path | None = None) -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (itself left out)."""
    root = _root(root)
    modules = project_modules(root)
    return {name: imports_of(path, modules, root) - {name} for name, path in modules.items()}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(*entries: str, root: Path | None = None) -> tuple[str, ...]:
    """The repository files (relative to ``root``, sorted) that the named modules run when
    imported: themselves, everything they import transitively inside the project (lazy imports
    too) and the ``__init__.py`` of every package on the way; never this module (:data:`SELF`)."""
    root = _root(root)
    modules = project_modules(root)
    missing = [e for e in entries if e not in modules]
    if missing:
        raise KeyError(f"not a project module: {', '.join(missing)}")
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen or name == SELF:
            continue
        seen.add(name)
        todo.extend(p for p in _parents(name) if p in modules)
        todo.extend(imports_of(modules[name], modules, root))
    return tuple(sorted(modules[m].relative_to(root).as_posix() for m in seen))


def source_file(name: str, root: Path | None = None) -> str:
    """A repository file, given as its path relative to ``root`` or as a dotted module name."""
    root = _root(root)
    if name.endswith(".py"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"no such source file: {name}")
        return Path(name).as_posix()
    modules = project_modules(root)
    if name not in modules:
        raise KeyError(f"not a project module: {name}")
    return modules[name].relative_to(root).as_posix()


# ----------------------------------------------------------------------------- dvc.yaml stages -> modules


def _command_name(fn: ast.FunctionDef, decorator: ast.Call) -> str:
    if decorator.args and isinstance(decorator.args[0], ast.Constant) and isinstance(decorator.args[0].value, str):
        return decorator.args[0].value
    return fn.name.replace("_", "-")


@lru_cache(maxsize=16)
def _cli_commands(path: str, mtime_ns: int) -> dict[tuple[str, ...], tuple[str, ...]]:
    """(command words) -> the modules its function in ``cli.py`` imports, read from ``@app.command``
    decorators and ``app.add_typer(sub, name=...)`` groups."""
    tree = ast.parse(Path(path).read_text(), filename=path)
    groups: dict[str, tuple[str, ...]] = {"app": ()}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_typer"
                and isinstance(node.func.value, ast.Name) and node.args and isinstance(node.args[0], ast.Name)):
            name = next((k.value.value for k in node.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)), None)
            if name and node.func.value.id in groups:
                groups[node.args[0].id] = groups[node.func.value.id] + (name,)
    commands: dict[tuple[str, ...], tuple[str, ...]] = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for dec in fn.decorator_list:
            if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "command"
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id in groups):
                imported = []
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        imported.extend(f"{node.module}.{a.name}" for a in node.names)
                        imported.append(node.module)
                    elif isinstance(node, ast.Import):
                        imported.extend(a.name for a in node.names)
                commands[groups[dec.func.value.id] + (_command_name(fn, dec),)] = tuple(dict.fromkeys(imported))
    return commands


def cmd_modules(cmd: str, root: Path | None = None) -> tuple[str, ...] | None:
    """The project modules a dvc.yaml ``cmd`` runs (``recon <command> ...``: what that command's
    function imports; ``python -m <module> ...``: that module), or None for a command that runs
    no project code."""
    root = _root(root)
    words = shlex.split(cmd)
    modules = project_modules(root)
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1] == "-m":
        if words[2] in SCRIPTS.values():
            words = ["recon", *words[3:]]
        elif words[2] in modules:
            return (words[2],)
        else:
            return None
    if not words or words[0] not in SCRIPTS:
        return None
    cli = root / f"{SCRIPTS[words[0]]}.py"
    commands = _cli_commands(str(cli), cli.stat().st_mtime_ns)
    args = words[1:]
    for n in range(len(args), 0, -1):
        if tuple(args[:n]) in commands:
            found = tuple(m for m in commands[tuple(args[:n])] if m in modules)
            if not found:
                raise ValueError(f"`{cmd}`: {cli.name}'s command imports no project module")
            return found
    raise ValueError(f"`{cmd}`: no such command in {cli.name}")


def stage_code(cmd: str, root: Path | None = None) -> tuple[str, ...] | None:
    """A stage's code deps: the closure of the modules its ``cmd`` runs, less :data:`NOT_DEPS`."""
    entries = cmd_modules(cmd, root)
    if entries is None:
        return None
    return tuple(f for f in closure(*entries, root=root) if f not in NOT_DEPS)


def is_code(dep: str) -> bool:
    """A dep that names a project source file (the entries ``--write`` owns)."""
    top = dep.split("/")[0]
    return dep.endswith(".py") and (dep == f"{PACKAGES[0]}.py" or top in PACKAGES[1:])


# ----------------------------------------------------------------------------- dvc.yaml, line by line


ITEM = re.compile(r"^(?P<indent>\s*)-\s+(?P<body>.*?)\s*$")
STAGE = re.compile(r"^  (?P<name>[\w.-]+):\s*(#.*)?$")


def _strip_comment(text: str) -> tuple[str, str]:
    """('value', '  # comment') of a YAML scalar line tail (a ``#`` after whitespace starts a comment)."""
    match = re.search(r"\s+#", text)
    return (text[:match.start()], text[match.start():]) if match else (text, "")


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


@dataclass
class Stage:
    name: str
    line: int                              # the "  name:" line
    end: int                               # one past its last line
    cmd: str | None = None
    cmd_line: int | None = None
    deps_line: int | None = None           # the "    deps:" line
    items: list[tuple[int, int, str]] = field(default_factory=list)   # (first line, end, path) of each dep

    @property
    def deps(self) -> list[str]:
        return [path for _, _, path in self.items]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blank(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def read_stages(lines: list[str]) -> dict[str, Stage]:
    """The stages of a dvc.yaml (as lines, without newlines): where each starts and ends, its
    ``cmd`` and its ``deps`` items. Only the block style this project writes is understood."""
    stages: dict[str, Stage] = {}
    in_stages, stage = False, None
    for i, line in enumerate(lines):
        if _blank(line):
            continue
        if _indent(line) == 0:
            in_stages, stage = line.split("#")[0].strip() == "stages:", None
            continue
        if not in_stages:
            continue
        if (match := STAGE.match(line)) is not None:
            stage = stages[match["name"]] = Stage(match["name"], i, i + 1)
            continue
        if stage is None:
            continue
        stage.end = i + 1
        if _indent(line) == 4 and line.lstrip().startswith("cmd:"):
            value = _strip_comment(line.split("cmd:", 1)[1])[0].strip()
            if value in ("", "|", ">", "|-", ">-") or value.startswith("["):
                raise ValueError(f"dvc.yaml stage {stage.name}: write its cmd on one line")
            stage.cmd, stage.cmd_line = _unquote(value), i
        elif _indent(line) == 4 and line.lstrip().startswith("deps:"):
            if _strip_comment(line.split("deps:", 1)[1])[0].strip():
                raise ValueError(f"dvc.yaml stage {stage.name}: write its deps as a block list")
            stage.deps_line = i
    for stage in stages.values():
        if stage.deps_line is not None:
            stage.items = _items(lines, stage.deps_line, stage.end)
    return stages


def _items(lines: list[str], deps_line: int, end: int) -> list[tuple[int, int, str]]:
    items: list[tuple[int, int, str]] = []
    item_indent = None
    for i in range(deps_line + 1, end):
        line = lines[i]
        if _blank(line):
            continue
        match = ITEM.match(line)
        if item_indent is None:
            if match is None or _indent(line) < 4:
                break
            item_indent = _indent(line)
        if match is not None and _indent(line) == item_indent:
            value = _unquote(_strip_comment(match["body"])[0])
            items.append((i, i + 1, value[:-1] if value.endswith(":") else value))
        elif _indent(line) > item_indent and items:          # an item's options
            items[-1] = (items[-1][0], i + 1, items[-1][2])
        else:
            break
    return items


def expected(text: str, root: Path | None = None) -> dict[str, tuple[str, ...]]:
    """Each stage that runs project code -> its code deps as derived (:func:`stage_code`)."""
    out = {}
    for name, stage in read_stages(text.splitlines()).items():
        code = stage_code(stage.cmd, root) if stage.cmd else None
        if code is not None:
            out[name] = code
    return out


def rewrite(text: str, root: Path | None = None) -> str:
    """``text`` with each stage's code deps replaced by the derived ones, after its data deps;
    every other line (data deps, comments, outs, metrics, plots) unchanged."""
    lines = text.splitlines()
    stages = read_stages(lines)
    wanted = expected(text, root)
    # bottom-up, so the line numbers of the stages above stay valid
    for stage in sorted(stages.values(), key=lambda s: s.line, reverse=True):
        if stage.name not in wanted:
            continue
        code = wanted[stage.name]
        if stage.deps_line is None:
            if not code:
                continue
            indent = " " * 4
            lines[stage.cmd_line + 1:stage.cmd_line + 1] = [f"{indent}deps:", *(f"{indent}  - {f}" for f in code)]
            continue
        if not stage.items:
            raise ValueError(f"dvc.yaml stage {stage.name}: an empty deps: block")
        first, last = stage.items[0][0], stage.items[-1][1]
        indent = " " * _indent(lines[first])
        comments = {}
        kept = []
        code_items = {i for i, (_, _, path) in enumerate(stage.items) if is_code(path)}
        starts = {start: k for k, (start, _, _) in enumerate(stage.items)}
        i = first
        while i < last:
            k = starts.get(i)
            if k is None:                                    # a comment or blank line in the list
                kept.append(lines[i])
                i += 1
                continue
            start, stop, path = stage.items[k]
            if k in code_items:
                comments[path] = _strip_comment(ITEM.match(lines[start])["body"])[1]
            else:
                kept.extend(lines[start:stop])
            i = stop
        lines[first:last] = kept + [f"{indent}- {f}{comments.get(f, '')}" for f in code]
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def diff(path: Path, root: Path | None = None) -> str:
    """A unified diff from ``path`` to what :func:`rewrite` makes of it ('' when they agree)."""
    text = Path(path).read_text()
    return "".join(difflib.unified_diff(text.splitlines(True), rewrite(text, root).splitlines(True),
                                        f"{Path(path).name} (now)", f"{Path(path).name} (derived)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon.runtime.codedeps", description=(
        "Derive each dvc.yaml stage's code deps from the import closure of the module its cmd runs."))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 and print the diff when dvc.yaml differs (default)")
    mode.add_argument("--write", action="store_true", help="rewrite the code entries of the deps: lists in place")
    mode.add_argument("--module", metavar="NAME", help="print the closure of a module (e.g. recon.pretraining.trainer)")
    parser.add_argument("--dvc-yaml", type=Path, action="append",
                        help="[default: every pipeline of the repository, PIPELINES]")
    args = parser.parse_args(argv)
    if args.module:
        print("\n".join(closure(args.module)))
        return 0
    status = 0
    for path in args.dvc_yaml or [ROOT / name for name in PIPELINES]:
        if args.write:
            text = path.read_text()
            new = rewrite(text)
            if new != text:
                path.write_text(new)
                print(f"{path}: code deps rewritten")
            else:
                print(f"{path}: code deps already up to date")
            continue
        found = diff(path)
        if found:
            sys.stdout.write(found)
            print(f"\n{path}: the code deps differ from the import closures; "
                  "run `python -m recon.runtime.codedeps --write`", file=sys.stderr)
            status = 1
        else:
            print(f"{path}: code deps match the import closures")
    return status


if __name__ == "__main__":
    sys.exit(main())
