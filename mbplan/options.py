"""Command options as dataclasses: one field per flag, its help in the field's metadata.

``add_dataclass_args`` turns such a dataclass into argparse flags (``--snake-case`` from
``snake_case``), ``from_namespace`` builds the dataclass back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its CLI help (and extra argparse kwargs such as ``choices``)."""
    factory = kwargs.pop("default_factory", None)
    meta = {"help": help, **kwargs}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) with Optional unwrapped."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; help text and default shown."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        flag = "--" + f.name.replace("_", "-")
        tp, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if tp is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text, **meta
            )
            continue
        kwargs: dict[str, Any] = {"type": tp, "default": default, "help": help_text, **meta}
        if is_list:
            kwargs["nargs"] = "+"
        shown = not meta.get("required") and default is not None and default not in ([], "")
        if "%(default)" not in help_text and shown:
            kwargs["help"] = f"{help_text} (default: %(default)s)"
        parser.add_argument(flag, **kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """Build dataclass ``cls`` from the parsed flags of :func:`add_dataclass_args`."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**values)
