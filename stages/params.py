"""One way to set any parameter: :func:`build_params` (every command, every stage helper).

A params dataclass is the schema: its fields are the keys of its params.yaml section, their
annotations the types every value is checked against, their comments the help (:func:`field_docs`).
Values come, later ones winning, from the dataclass defaults, the section of params.yaml, the
``--set KEY=VALUE`` texts (dotted keys reach nested sections) and the caller's options."""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib
import inspect
import io
import os
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from stages.common import StageError

P = TypeVar("P")


def params_file() -> Path:
    """Where the parameters live: ``$RECON_PARAMS`` or ``./params.yaml``."""
    return Path(os.environ.get("RECON_PARAMS", "params.yaml"))


#: what the entries of a ``dict`` field override, by field name (the same in every section):
#: "module:Class", imported only when such a key is checked
OVERRIDES = {
    "model": "recon.network.model:ReConConfig",
    "seg": "recon.downstream.partseg_net:PartSegConfig",
    "pretrain": "recon.pretraining.trainer:PretrainParams",
    "finetune": "recon.downstream.recipes:FinetuneParams",
    "fewshot_finetune": "recon.downstream.recipes:FinetuneParams",
    "fewshot": "recon.downstream.evaluate:FewshotSettings",
}
_NOT = object()   # "does not convert"


def build_params(cls: type[P], section: str, options: dict[str, Any] | None = None,
                 sets: Iterable[str] | None = None) -> P:
    """The parameters of a command: ``cls``'s defaults, then ``params.yaml[section]`` (the file
    of ``params_file()``), then ``sets`` (``KEY=VALUE`` texts, ``--set``), then ``options`` (the
    explicit command-line options; None means "not given"). A VALUE is YAML; a dotted KEY reaches
    into a dict field (``model.depth=12``) and may start with the section (``pretrain.lr=1e-4``).
    Every key must be a field (of the dataclass a dict field overrides, for nested keys) and
    every value must fit its annotation: anything else is a ``StageError`` naming the valid keys."""
    values: dict[str, Any] = {}
    path = params_file()
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        given = loaded.get(section) or {} if isinstance(loaded, dict) else None
        if not isinstance(given, dict):
            raise StageError(f"{path}: section {section!r} must be a mapping of keys to values")
        for key, value in given.items():
            _set_key(cls, values, [str(key)], value, section, f" (in {path})")
    for text in sets or ():
        keys, value = parse_set(text)
        if len(keys) > 1 and keys[0] == section and section not in _fields(cls):
            keys = keys[1:]
        _set_key(cls, values, keys, value, section, f" (--set {text})")
    for key, value in (options or {}).items():
        if value is not None:
            _set_key(cls, values, [key], value, section, " (command-line option)")
    return cls(**values)


def parse_set(text: str) -> tuple[list[str], Any]:
    """``"model.depth=12"`` → (["model", "depth"], 12): the key split on dots, the value read as YAML."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise StageError(f"--set {text!r}: expected KEY=VALUE, e.g. --set epochs=10 or --set model.depth=12")
    try:
        return keys, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise StageError(f"--set {text}: {raw!r} is not a YAML value ({' '.join(str(err).split())})") from None


def override_class(cls: type, name: str) -> type | None:
    """The dataclass whose fields the entries of ``cls``'s dict field ``name`` override, if any."""
    if name not in OVERRIDES or typing.get_type_hints(cls).get(name) is not dict:
        return None
    module, attr = OVERRIDES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def type_name(tp: Any) -> str:
    """An annotation as the help and the errors write it: ``int``, ``float | None``, ``list[int]``."""
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    name = getattr(typing.get_origin(tp) or tp, "__name__", str(tp))
    return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Each field's help text, read from the source of ``cls`` and its dataclass bases: the
    ``# ...`` comment on the field's line(s), continued by comment-only lines right below that are
    indented deeper than the field, or else the ``#: ...`` lines right above it. A subclass's
    comment wins; a field without one inherits its base's."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _class_comments(klass).items() if v})
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _class_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    own_line = {n for n in comments if lines[n - 1].lstrip().startswith("#")}

    def text(n: int) -> str:
        return re.sub(r"^#:?\s*", "", comments[n]).strip()

    found: dict[str, str] = {}
    node = ast.parse(source).body[0]
    for stmt in getattr(node, "body", []):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        parts = [text(n) for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments and n not in own_line]
        n = stmt.end_lineno + 1
        while parts and n in own_line and not comments[n].startswith("#:") \
                and len(lines[n - 1]) - len(lines[n - 1].lstrip()) > stmt.col_offset:
            parts.append(text(n))
            n += 1
        if not parts:
            n = stmt.lineno - 1
            while n in own_line and comments[n].startswith("#:"):
                parts.insert(0, text(n))
                n -= 1
        found[stmt.target.id] = " ".join(p for p in parts if p)
    return found


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else copy.deepcopy(f.default)


def _set_key(cls: type, values: dict[str, Any], keys: list[str], value: Any, where: str, source: str) -> None:
    """``values[keys[0]]...[keys[-1]] = value``, checked against ``cls``'s fields and annotations."""
    fields = _fields(cls)
    name = keys[0]
    if name not in fields:
        raise StageError(f"unknown key {where}.{name}{source}; valid keys: {', '.join(fields)}")
    tp, nested = typing.get_type_hints(cls)[name], override_class(cls, name)
    label = f"{where}.{name}"
    if len(keys) == 1:
        if nested is not None:
            if not isinstance(value, dict):
                raise StageError(f"{label} must be a mapping of {nested.__name__} keys, got {value!r}{source}")
            checked: dict[str, Any] = {}
            for key, item in value.items():
                _set_key(nested, checked, [str(key)], item, label, source)
            values[name] = checked
        else:
            values[name] = _coerce(value, tp, label, source)
        return
    current = values[name] if name in values else _default(fields[name])
    if not isinstance(current, dict) or not (nested is not None or tp is dict or typing.get_origin(tp) is dict):
        raise StageError(f"{label} ({type_name(tp)}) is not a mapping, so it has no key {'.'.join(keys[1:])}{source}: "
                         f"set it whole, {name}=VALUE")
    current = copy.deepcopy(current)
    if nested is not None:
        _set_key(nested, current, keys[1:], value, label, source)
    else:
        item_type = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        inner = current
        for key in keys[1:-1]:
            inner = inner.setdefault(key, {})
            if not isinstance(inner, dict):
                raise StageError(f"{label}.{key} is not a mapping{source}")
        inner[keys[-1]] = _coerce(value, item_type if len(keys) == 2 else Any, f"{label}.{'.'.join(keys[1:])}", source)
    values[name] = current


def _coerce(value: Any, tp: Any, label: str, source: str) -> Any:
    """``value`` as annotation ``tp``: exact types first, then conversions (``"2e-5"`` → float)."""
    for lenient in (False, True):
        out = _convert(value, tp, lenient)
        if out is not _NOT:
            return out
    raise StageError(f"{label} must be {type_name(tp)}, got {value!r}{source}")


def _convert(value: Any, tp: Any, lenient: bool) -> Any:
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        return None if value is None else _NOT
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return next((out for a in args if (out := _convert(value, a, lenient)) is not _NOT), _NOT)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _NOT
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return _NOT
            items = [_convert(v, a, lenient) for v, a in zip(value, args)]
        else:
            items = [_convert(v, args[0], lenient) if args else v for v in value]
        return _NOT if any(i is _NOT for i in items) else items
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            return _NOT
        if not args:
            return dict(value)
        pairs = [(_convert(k, args[0], lenient), _convert(v, args[1], lenient)) for k, v in value.items()]
        return _NOT if any(k is _NOT or v is _NOT for k, v in pairs) else dict(pairs)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        return value if isinstance(value, bool) else _NOT
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return _parse(int, value) if lenient else _NOT
    if tp is float:
        if number:
            return float(value)
        return _parse(float, value) if lenient else _NOT
    if tp is str:
        if isinstance(value, str):
            return value
        return str(value) if lenient and number else _NOT
    return value if isinstance(tp, type) and isinstance(value, tp) else _NOT


def _parse(kind: type, value: Any) -> Any:
    if not isinstance(value, str):
        return _NOT
    try:
        return kind(value.strip())
    except ValueError:
        return _NOT


