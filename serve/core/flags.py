"""One way to bind command-line flags to config dataclasses (torch-free).

A flag is declared once, for a field of a config dataclass (:class:`Flag`): its default,
type and choices come from that field (a ``Literal[...]`` annotation gives the choices, a
``bool`` a switch, a ``tuple`` a list), so nothing is named twice. :func:`add_flags` puts
the flags on a parser (or an argument group); :func:`build` makes the config from the
parsed arguments. A nested field is named by its path (``"gate.min_agreement"``: the
``min_agreement`` of the config's ``gate``), and :func:`given` returns only the fields
whose flags were given (for configs layered over a recipe).

    ENGINE_FLAGS = [Flag("min_batch", "--min-batch", "engine profile: min batch"), ...]
    add_flags(group, EngineProfile, ENGINE_FLAGS)
    profile = build(EngineProfile, args, ENGINE_FLAGS)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

_GROUP = argparse.ArgumentParser | argparse._ArgumentGroup


@dataclass(frozen=True)
class Flag:
    """``option`` (e.g. ``--min-agreement``; ``--no-X`` for a switch that turns a field
    off) sets config field ``field``. ``settings`` are extra argparse settings (metavar,
    nargs, a default that differs from the field's, ...)."""

    field: str
    option: str
    help: str = ""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.field.replace(".", "__")


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` annotation (``()`` for any other type)."""
    return get_args(hint) if get_origin(hint) is Literal else ()


def _hint_and_default(cls: type, path: str) -> tuple[Any, Any]:
    """The annotation and the default of the field at ``path`` (dots for nested fields)."""
    *parents, name = path.split(".")
    owner: Any = cls
    default_owner: Any = None
    for part in parents:
        f = _field(owner, part)
        default_owner = _default_of(f) if default_owner is None else getattr(default_owner, part)
        owner = get_type_hints(owner)[part]
    hint = get_type_hints(owner)[name]
    if default_owner is not None:
        return hint, getattr(default_owner, name)
    return hint, _default_of(_field(owner, name))


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _settings(flag: Flag, hint: Any, default: Any, layered: bool = False) -> dict[str, Any]:
    """argparse settings for ``flag`` from its field's annotation and default (layered: no
    default, so only flags given are set, and every switch can say yes or no)."""
    hint = _unwrap_optional(hint)
    out: dict[str, Any] = {"dest": flag.dest, "help": flag.help, "default": default}
    if layered:
        out["default"] = default = argparse.SUPPRESS
    if hint is bool:
        if flag.option.startswith("--no-"):
            out["action"] = "store_false"
        elif default or layered:
            out["action"] = argparse.BooleanOptionalAction
        else:
            out["action"] = "store_true"
    elif choices := literal_choices(hint):
        out["choices"] = choices
        out["type"] = type(choices[0])
    elif get_origin(hint) in (tuple, list):
        item = get_args(hint)[0] if get_args(hint) else str
        out["nargs"] = "+"
        out["type"] = item
        if default is not argparse.SUPPRESS:
            out["default"] = list(default) if default is not None else None
    elif hint in (int, float, str):
        out["type"] = hint
    out.update(flag.settings)
    if out.get("action") in ("store_true", "store_false", argparse.BooleanOptionalAction):
        out.pop("type", None)
    elif "choices" not in out:  # named for the flag, not for the field behind it
        out.setdefault("metavar", flag.option.lstrip("-").replace("-", "_").upper())
    return out


def add_flags(parser: _GROUP, cls: type, flags: Sequence[Flag], *, layered: bool = False) -> None:
    """Add every flag of ``flags`` (fields of dataclass ``cls``) to ``parser``. With
    ``layered`` the flags have no defaults (a flag not given is absent from the parsed
    arguments, :func:`given` leaves it out) and every ``bool`` is a ``--X/--no-X`` pair:
    for configs whose values come from a recipe first."""
    for flag in flags:
        hint, default = _hint_and_default(cls, flag.field)
        parser.add_argument(flag.option, **_settings(flag, hint, default, layered))


def given(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """The fields whose flags are set in ``args`` (with ``argparse.SUPPRESS`` defaults:
    the ones given on the command line), by field path."""
    return {f.field: getattr(args, f.dest) for f in flags if hasattr(args, f.dest)}


def build(cls: type[T], args: argparse.Namespace, flags: Sequence[Flag], **fields: Any) -> T:
    """The ``cls`` config the parsed ``args`` describe: each flag's value goes to its
    field (nested fields into their sub-configs, built from the sub-config's defaults),
    fields without a flag keep their defaults, and ``fields`` (already built values,
    e.g. a sub-config) win."""
    return _assemble(cls, {**given(args, flags), **fields})


def _split(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``{"a": 1, "gate.x": 2}`` -> ``({"a": 1}, {"gate": {"x": 2}})``."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    return top, nested


def _assemble(cls: type[T], values: dict[str, Any]) -> T:
    hints = get_type_hints(cls)
    top, nested = _split(values)
    top = {k: _coerce(hints[k], v) for k, v in top.items()}
    for head, sub in nested.items():
        base = top[head] if head in top else _default_of(_field(cls, head))
        top[head] = _replace(base, sub)
    return cls(**top)


def _replace(obj: Any, values: dict[str, Any]) -> Any:
    """``obj`` (a dataclass instance) with ``values`` (paths below it) replaced."""
    hints = get_type_hints(type(obj))
    top, nested = _split(values)
    changes = {k: _coerce(hints[k], v) for k, v in top.items()}
    changes |= {head: _replace(getattr(obj, head), sub) for head, sub in nested.items()}
    return dataclasses.replace(obj, **changes)


def _coerce(hint: Any, value: Any) -> Any:
    hint = _unwrap_optional(hint)
    if get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


__all__ = ["Flag", "add_flags", "build", "given", "literal_choices"]
