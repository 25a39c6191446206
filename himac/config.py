"""Flat YAML configs mapped onto one dataclass per component.

An experiment is one YAML file whose keys are dataclass field names, with no
nesting: `group_size: 8`, not `planner: {group_size: 8}`. Each component (model,
planner, executor, update, run, environment) owns a dataclass; every key belongs
to exactly one of them. This module is generic: it knows nothing about HiMAC,
only how to route flat keys to sections and check their types, so each default
lives in exactly one place (the dataclass field).

Unknown keys, wrong types and bad values raise `ConfigError` naming the key. A field's
bounds and choices are its type (`Annotated[int, Range(ge=1)]`, `Literal[...]`), checked by
`validate` (envs/base.py) in each dataclass's __post_init__.

Every key says what kind it is, as the first word of its docstring: `(paper)` one of
the paper's hyper-parameters or switches, `(departure)` a departure from the paper that
a shipped config uses, with its measured reason in docs/results.md, or `(infra)`
infrastructure (device, budget, logging, data). `--keys` prints them.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from envs.base import ConfigError, Range, check, validate  # noqa: F401 - defined at the bottom layer, re-exported

_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Return `value` checked against the type `hint`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:  # the type of its choices; which values are allowed, validate() says
        return _coerce(key, value, type(typing.get_args(hint)[0]))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}' = {value!r}: "
                          f"expected {hint}")
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a list")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-4" as a string; a user means a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config type {hint} for key '{key}'")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build(cls: type, flat: dict[str, Any]) -> Any:
    """Instantiate dataclass `cls` from the subset of `flat` naming its fields."""
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in flat.items() if k in hints}
    return cls(**kwargs)


def route(flat: dict[str, Any], sections: dict[str, type], source: str) -> dict[str, Any]:
    """Split a flat dict over `sections` (name -> dataclass). Unknown keys fail loudly."""
    owner: dict[str, str] = {}
    for name, cls in sections.items():
        for f in field_names(cls):
            if f in owner:  # a programming error, caught by a test
                raise TypeError(f"config key '{f}' is defined by both {owner[f]} and {name}")
            owner[f] = name
    unknown = [k for k in flat if k not in owner]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(owner), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{k}' in {source}{hint}")
    return {name: build(cls, flat) for name, cls in sections.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of key: value")
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config key '{nested[0]}' in {path} is nested; configs are flat")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "failure_keywords=[a, b]"]` -> dict, values parsed as YAML scalars/lists."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML") from None
        out[key.strip()] = value
    return out


def to_flat(sections: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `route`: the resolved flat config, for writing into a run directory."""
    flat: dict[str, Any] = {}
    for obj in sections.values():
        flat.update(dataclasses.asdict(obj))
    return flat


KINDS = ("paper", "departure", "infra")
_KIND = re.compile(r"\((" + "|".join(KINDS) + r")\)\s*")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (the convention in this codebase)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def field_kind(doc: str) -> tuple[str, str]:
    """('paper' | 'departure' | 'infra' | '', the rest of the docstring) of a field's docstring."""
    m = _KIND.match(doc)
    return (m.group(1), doc[m.end():]) if m else ("", doc)


def describe(sections: dict[str, type]) -> str:
    """A markdown table of every key: name, section, kind, default, meaning."""
    rows = ["| key | section | kind | default | meaning |", "|---|---|---|---|---|"]
    for name, cls in sections.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind, doc = field_kind(docs.get(f.name, ""))
            rows.append(f"| `{f.name}` | {name} | {kind} | `{default!r}` | {doc} |")
    return "\n".join(rows)
