"""One validation pass for settings, derived from a dataclass's own type hints and declared bounds.

Every settings dataclass (``TrainConfig``, ``GeneratorConfig``, the eval command's settings) goes
through :func:`check_fields` before a model loads or a file is written. The field's type hint says
what a value must be; nothing is guessed from truthiness:

- ``bool``: a real boolean (a YAML ``false``, not the string ``"false"``, not ``0``);
- ``int``: a whole number (``2.5`` and ``true`` are refused; a numeric string from YAML is read);
- ``float``: a finite number (``inf`` and ``nan`` are refused; YAML 1.1's ``"3e-4"`` is read);
- ``str``: non-empty text; ``list[str]``: a list of non-empty texts or one comma-separated text;
- ``dict``: a mapping with text keys; ``X | None``: ``None`` or an X.

Bounds (ranges, accepted values) are declared per field, in the field's metadata
(``field(default=..., metadata=bounds(gt=0))``) or in a table passed by the caller. A field nobody
declared bounds for still gets its type checked, and an ``int`` one must be ``>= 0`` (counts and
sizes are what integer settings are): a field added later is covered without extra work.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from petmix.errors import PetmixError


@dataclass(frozen=True)
class Bounds:
    """What values a setting accepts beyond its type: a range and/or a set of choices."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of: " + ", ".join(self.choices)
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if lo and hi:
            return f"a value in {lo}, {hi}"
        if lo:
            return f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        if hi:
            return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"
        return "any value"

    def admits(self, v: Any) -> bool:
        if self.choices is not None:
            return v in self.choices
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))


def bounds(**kw: Any) -> dict[str, Bounds]:
    """Field metadata declaring a setting's bounds: ``field(default=1.0, metadata=bounds(gt=0))``."""
    return {"bounds": Bounds(**kw)}


COUNT = Bounds(ge=0)  # the default for integer settings without declared bounds


def _kind(hint: Any) -> tuple[Any, bool]:
    """(the base type, whether None is allowed) of a type hint such as ``int | None``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def convert(hint: Any, v: Any, where: str) -> Any:
    """``v`` as the type ``hint`` asks for, or a PetmixError naming ``where``."""
    base, optional = _kind(hint)
    if v is None:
        if optional:
            return None
        if typing.get_origin(base) is dict or base is dict:
            return {}  # `generator:` with nothing under it in YAML
        raise PetmixError(f"{where}: needs a value ({_type_words(base)}), got nothing (null)")
    if base is bool:
        if isinstance(v, bool):
            return v
        raise PetmixError(f"{where}: must be true or false, got {_show(v)}"
                          + (" (a quoted string: write true or false without quotes)" if isinstance(v, str) else ""))
    if base is int:
        if isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:
                raise PetmixError(f"{where}: must be a whole number, got {_show(v)}") from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise PetmixError(f"{where}: must be a whole number, got {_show(v)}")
        return v
    if base is float:
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise PetmixError(f"{where}: must be a number, got {_show(v)}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PetmixError(f"{where}: must be a number, got {_show(v)}")
        if not math.isfinite(v):
            raise PetmixError(f"{where}: must be a finite number, got {v}")
        return float(v)
    if base is str:
        if not isinstance(v, str):
            raise PetmixError(f"{where}: must be text, got {_show(v)} ({type(v).__name__})")
        if not v.strip():
            raise PetmixError(f"{where}: must not be empty")
        return v
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base) or (Any,)
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",") if t.strip()]
        if not isinstance(v, (list, tuple)):
            raise PetmixError(f"{where}: must be a list (or comma-separated text), got {_show(v)}")
        return [convert(item, x, f"{where}[{i}]") for i, x in enumerate(v)] if item is not Any else list(v)
    if typing.get_origin(base) is dict or base is dict:
        if not isinstance(v, Mapping):
            raise PetmixError(f"{where}: must be a mapping of settings, got {_show(v)}")
        bad = [k for k in v if not isinstance(k, str)]
        if bad:
            raise PetmixError(f"{where}: keys must be names, got {_show(bad[0])}")
        return dict(v)
    return v  # a type this pass does not know: left to the code that uses it


def _type_words(base: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(base, str(base))


@functools.cache
def _fields_of(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def check_keys(values: Mapping[Any, Any], known: Iterable[str], name: Callable[[str], str]) -> None:
    """Every key is a name, and a known one (a PetmixError names the first that is not, with the
    closest known name)."""
    for k in values:
        if not isinstance(k, str):
            raise PetmixError(f"{name(str(k))}: a setting's name must be text, got {_show(k)}")
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise PetmixError(f"{name(unknown[0])}: not a setting (unknown keys {unknown}; {hint}"
                          f"known: {', '.join(known)})")


def check_fields(cls: type, values: Mapping[Any, Any], name: Callable[[str], str],
                 table: Mapping[str, Bounds] | None = None) -> dict[str, Any]:
    """The values for dataclass ``cls`` converted to their declared types and checked against their
    bounds; ``name(key)`` says how to call a key in a message (a flag, or a file and key).
    Unknown keys and keys that are not names are refused too."""
    hints, fields = _fields_of(cls)
    check_keys(values, fields, name)
    out: dict[str, Any] = {}
    for key, v in values.items():
        where = name(key)
        v = convert(hints[key], v, where)
        base, _ = _kind(hints[key])
        rule = fields[key].metadata.get("bounds") or (table or {}).get(key)
        if rule is None and base is int:
            rule = COUNT
        if rule is not None and v is not None:
            items = v if isinstance(v, list) else [v]
            for x in items:
                if isinstance(x, (int, float, str)) and not rule.admits(x):
                    raise PetmixError(f"{where}: must be {rule.describe()}, got {_show(x)}")
        out[key] = v
    return out


def namer(source: str, flags: set[str] | frozenset[str] = frozenset()) -> Callable[[str], str]:
    """How messages call a key: ``--lora-dropout`` when it came from the command line, else
    ``FILE: lora_dropout`` (or ``entry LABEL: lora_dropout``)."""
    def name(key: str) -> str:
        if key in flags:
            return "--" + key.replace("_", "-")
        return f"{source}: {key}"

    return name
