"""A small strict reader for the model card's dataclasses (torch-free): a JSON object
becomes the dataclass it must be, and :class:`CardError` names the first thing that is
wrong (unknown or missing keys, a value of the wrong type).
:meth:`serve.core.card.ModelCard.from_dict` reads with it."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from serve.backend.errors import UserError


class CardError(UserError, ValueError):
    """A model card (or the card part of a checkpoint) that does not follow the schema."""


def build(cls: type, data: Any, where: str) -> Any:
    """The dataclass ``cls`` from the object ``data`` (``where`` names it in errors)."""
    if not isinstance(data, dict):
        raise CardError(f"{where} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CardError(f"{where} has unknown keys: {', '.join(unknown)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise CardError(f"{where}.{f.name} is missing")
            continue
        values[f.name] = _coerce(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        return cls(**values)
    except CardError as e:
        raise CardError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type, tp), value, where)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise CardError(f"{where} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CardError(f"{where} must be an object, got {type(value).__name__}")
        key_t, val_t = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(val_t, v, f"{where}[{k!r}]") for k, v in value.items()}
    return _scalar(tp, value, where)


def _scalar(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against a scalar type (bool, int, float, str); others as they are."""
    if tp is bool:
        if not isinstance(value, bool):
            raise CardError(f"{where} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CardError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CardError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise CardError(f"{where} must be a string, got {value!r}")
        return value
    return value
