"""The command line of every entry point: argv and a YAML file → a validated :class:`~vr1fast.config.Config`.

Grammar (``python -m vr1fast.train --help`` prints it with every key)::

    [--preset NAME] [--config FILE] [--section.key=VALUE | --section.key VALUE ...] [-h | --help]

Order: the preset (default ``demo``; a YAML file may name one with ``preset:``), then the YAML file, then the
arguments left to right. A VALUE is read as YAML and must fit the field's type: ``3e-5``, ``true``/``false``,
``null`` (where the field is Optional), ``[0.9, 0.95]`` for a tuple; a string field also takes text that is not
YAML (``--model.path=...``). An unknown section or key, or a value that does not fit, is a :class:`ConfigError`
whose one-line message names the field; :func:`run_main` prints it and exits 2.

A dataclass CLI library (tyro 1.0.17) was measured against this grammar and not used: it reads tuples as
separate words (``--optim.betas 0.9 0.95``), Optional as ``None`` (``--data.path=null`` became the string
"null"), bools as ``True``/``False`` only, and prints multi-line boxes; keeping the grammar needed the same key
walk as here plus a value rule and error interception through a private hook.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import os
import shutil
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from vr1fast.config import PRESETS, Config, validate
from vr1fast.errors import ConfigError, Vr1fastError

DEFAULT_PRESET = "demo"
HELP = ("-h", "--help")


# ---------------------------------------------------------------- values


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _takes_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _parse_value(text: str, tp: Any, where: str) -> Any:
    """Parse a CLI string into the field type ``tp`` (YAML syntax: 1e-6, true, null, [0.9, 0.95])."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        if _takes_text(tp):
            return text
        raise ConfigError(f"{where}: cannot parse {text!r}: {getattr(e, 'problem', None) or _one_line(e)}") from None
    return _coerce(value, tp, where)


def _coerce_number(value: Any, tp: type, where: str) -> Any:
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        return _coerce_number(value, tp, where)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def set_value(cfg: Any, dotted: str, value: Any, *, from_text: bool) -> None:
    """Set ``section.key`` (or a top-level key) on the dataclass tree ``cfg``; unknown names raise ConfigError."""
    parts = dotted.split(".")
    node = cfg
    for i, name in enumerate(parts):
        hints = typing.get_type_hints(type(node))
        if name not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} (known here: {known})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, name)):
                raise ConfigError(f"{dotted!r} is a section; set its keys, e.g. --{dotted}.<key>=...")
            tp = hints[name]
            setattr(node, name, _parse_value(value, tp, dotted) if from_text else _coerce(value, tp, dotted))
        else:
            node = getattr(node, name)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"{'.'.join(parts[: i + 1])!r} is a value, not a section")


# ---------------------------------------------------------------- YAML


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return data


def load_yaml(cfg: Config, path: str | Path) -> None:
    """Apply a YAML file of sections to ``cfg`` (its ``preset:`` key, if any, is read by :func:`parse`)."""
    data = _read_yaml(path)
    data.pop("preset", None)
    for key, value in _flatten(data):
        set_value(cfg, key, value, from_text=False)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML that ``--config`` reads back to the same Config."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)


# ---------------------------------------------------------------- argv


@dataclass
class _Args:
    preset: Optional[str] = None
    config: Optional[str] = None
    overrides: list[tuple[str, str]] = field(default_factory=list)
    help: bool = False


def _split(argv: list[str]) -> _Args:
    """Tokens → preset, config file, ``(key, text)`` overrides in order, and whether help was asked for."""
    out, i = _Args(), 0
    while i < len(argv):
        arg = argv[i]
        if arg in HELP:
            out.help, i = True, i + 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"{arg} needs a value (--{key}=VALUE)")
            value, i = argv[i + 1], i + 1
        if key == "preset":
            out.preset = value
        elif key == "config":
            out.config = value
        else:
            out.overrides.append((key, value))
        i += 1
    return out


def _base(args: _Args, default_preset: str = DEFAULT_PRESET) -> Config:
    """The preset (named on the command line, else by the YAML file, else ``default_preset``) with the YAML file
    applied."""
    name = args.preset
    if name is None and args.config:
        name = _read_yaml(args.config).get("preset")
    name = name or default_preset
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[name]()
    if args.config:
        load_yaml(cfg, args.config)
    return cfg


def parse(argv: list[str] | None, prog: str = "vr1fast", default_preset: str = DEFAULT_PRESET) -> Config:
    """``[--preset NAME] [--config FILE] [--section.key=value ...]`` → a validated Config (``default_preset`` when
    neither names one).

    ``-h``/``--help`` prints :func:`help_text` (defaults: the preset and YAML file named) and exits 0.
    """
    args = _split(list(argv or []))
    cfg = _base(args, default_preset)
    if args.help:
        print(help_text(cfg, prog), flush=True)
        raise SystemExit(0)
    for key, value in args.overrides:
        set_value(cfg, key, value, from_text=True)
    validate(cfg)
    return cfg


def run_main(fn: Callable[[Config], Optional[int]], argv: list[str] | None, prog: str,
             default_preset: str = DEFAULT_PRESET) -> None:
    """Parse ``argv`` (None: ``sys.argv[1:]``; ``default_preset`` unless it names one), call ``fn(cfg)``, and exit
    with its non-zero return code.

    An expected failure (:class:`Vr1fastError`, ``FileNotFoundError``) drops the process group without a barrier
    and prints ``prog: error: message`` on one line, then exits 2 for a ConfigError and 1 otherwise. A config
    error is the same on every rank, so only rank 0 prints it; any other error is printed by each rank that
    hits it, with ``(rank R)`` when there are several ranks.
    """
    try:
        code = fn(parse(sys.argv[1:] if argv is None else argv, prog, default_preset))
    except (Vr1fastError, FileNotFoundError) as e:
        from vr1fast import dist
        dist.abort()
        rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
        config = isinstance(e, ConfigError)
        if rank == "0" or not config:
            where = f" (rank {rank})" if world > 1 and not config else ""
            print(f"{prog}: error{where}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2 if config else 1) from None
    if code:
        raise SystemExit(code)


# ---------------------------------------------------------------- --help


def field_docs(cls: type) -> dict[str, str]:
    """Each field's help: the comment on its line plus the comment-only lines right below it, joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    owner = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            owner.update({line: node.target.id for line in range(node.lineno, node.end_lineno + 1)})
    docs: dict[str, list[str]] = {}
    last = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and last is not None:
            docs.setdefault(last, []).append(tok.string.lstrip("#").strip())
        elif tok.type == tokenize.NL and not tok.line.strip():
            last = None
        elif tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            last = owner.get(tok.start[0])
    return {name: " ".join(lines) for name, lines in docs.items()}


def type_name(tp: Any) -> str:
    """The VALUE a field takes, in the grammar above: INT, FLOAT|null, {a,b}, [FLOAT, FLOAT], true|false."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in args if a is not type(None)) + "|null"
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is tuple:
        inner = [type_name(args[0]), "..."] if args[-1] is Ellipsis else [type_name(a) for a in args]
        return "[" + ", ".join(inner) + "]"
    return {bool: "true|false", int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, getattr(tp, "__name__", str(tp)))


def _entries(prefix: str, node: Any) -> list[tuple[str, str]]:
    """``(--key TYPE, default and doc)`` for the non-section fields of one dataclass node."""
    hints, docs = typing.get_type_hints(type(node)), field_docs(type(node))
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if not dataclasses.is_dataclass(value):
            shown = value if isinstance(value, str) else json.dumps(value)
            out.append((f"--{prefix}{f.name} {type_name(hints[f.name])}",
                        f"(default: {shown}) {docs.get(f.name, '')}".rstrip()))
    return out


def _sections(prefix: str, node: Any) -> list[tuple[str, Any]]:
    """``(dotted name, node)`` of every section below ``node``, each followed by its own subsections."""
    out = []
    for f in dataclasses.fields(node):
        if dataclasses.is_dataclass(child := getattr(node, f.name)):
            out += [(prefix + f.name, child), *_sections(f"{prefix}{f.name}.", child)]
    return out


def help_text(cfg: Config, prog: str) -> str:
    """Usage, the presets, then every section with its keys, types, defaults (``cfg``'s values) and docs."""
    width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    lines = [f"usage: {prog} [--preset NAME] [--config FILE] [--section.key=VALUE | --section.key VALUE ...]", "",
             *textwrap.wrap(f"Order: the preset ({cfg.preset} here; a --config YAML file may name one with "
                            "'preset:'), then "
                            "the YAML file, then the arguments. VALUE is YAML: 3e-5, true/false, null, [0.9, 0.95]. "
                            f"Defaults below are the values before the arguments: preset {cfg.preset} and the --config "
                            "file, if one is given.", width),
             "", "presets (--preset NAME):"]
    pad = max(map(len, PRESETS)) + 2
    lines += [f"  {name:<{pad}}{(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in PRESETS.items()]
    groups = [("options:", [*_entries("", cfg), ("--config FILE", "a YAML file of sections (and preset: NAME)"),
                            ("-h, --help", "print this and exit")])]
    groups += [(f"{name}: {(type(node).__doc__ or '').strip().partition(chr(10))[0]}".rstrip(),
                _entries(f"{name}.", node)) for name, node in _sections("", cfg)]
    for title, entries in groups:
        lines += ["", title]
        for key, text in entries:
            lines.append(f"  {key}")
            lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
