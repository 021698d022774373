"""One way configuration becomes typed objects: the run configuration, device facts and profile
choices, fleets, speaker sets and scenarios are declared with :func:`settings`, so each states its
keys, types and ranges once and is validated by the same code.

A configuration class is a frozen dataclass decorated with :func:`settings`: pydantic validates
every construction (keyword arguments in code, a TOML table, Flower's flat keys) against the
field types and their ``Field`` constraints, rejects unknown keys, and reads each key in
kebab-case (``dp.clip-norm``, as in TOML files and ``--run-config``) or snake_case. Whatever is
wrong becomes one :class:`~fedvox.shared.errors.ConfigError` line that names the key, the file
and what the key accepts, e.g. ``run.toml: run-config dp.delta must be in (0, 1), got 2.0``.
Checks across keys are ``model_validator`` methods raising :class:`ValueError` with a message
that names the keys.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, dataclass_transform, get_args, get_origin

import annotated_types
import pydantic.dataclasses
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from fedvox.shared.errors import ConfigError

T = TypeVar("T")


def kebab(name: str) -> str:
    """The key a field is written as in configuration files (``noise_multiplier`` -> ``noise-multiplier``)."""
    return name.replace("_", "-")


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def settings(what: str) -> Callable[[type[T]], type[T]]:
    """Make a class a validated, frozen configuration dataclass; ``what`` names it in errors.

    Values are converted where nothing is lost (``"2"`` or ``2.0`` for an ``int``, ``"true"`` for a
    ``bool``); a field typed ``StrictInt``/``StrictBool`` takes its own type only, as TOML gives it.
    """
    config = ConfigDict(extra="forbid", alias_generator=kebab, validate_by_name=True, validate_by_alias=True)

    def make(cls: type[T]) -> type[T]:
        made: Any = pydantic.dataclasses.dataclass(frozen=True, config=config)(cls)
        made.__fedvox_what__ = what
        validate = made.__init__

        @functools.wraps(validate)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                validate(self, *args, **kwargs)
            except ValidationError as exc:
                raise config_error(exc, made) from None

        made.__init__ = __init__
        return made

    return make


def accepts(test: Callable[[Any], bool], accepted: str) -> AfterValidator:
    """A field's check beyond its type and range: ``Annotated[str, accepts(test, "cpu or mps")]``
    refuses a value ``test`` rejects with "must be cpu or mps"."""

    def check(value: Any) -> Any:
        if not test(value):
            raise PydanticCustomError("accepts", "must be {accepted}", {"accepted": accepted})
        return value

    return AfterValidator(check)


def choice(options: tuple[str, ...]) -> AfterValidator:
    """A ``str`` field that takes one of ``options``."""
    return accepts(options.__contains__, f"one of {', '.join(options)}")


def parse(cls: type[T], values: Mapping[str, Any], where: str | Path = "", prefix: str = "") -> T:
    """Validate ``values`` (keys as in a TOML table, nested tables as mappings) into ``cls``.

    ``where`` (a file) starts the message of the :class:`ConfigError` raised for a bad value;
    ``prefix`` is what the keys were written under (``profile.`` in a node config).
    """
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as exc:
        raise config_error(exc, cls, where, prefix) from None


def dump(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`parse`: nested plain values under the keys a file uses."""
    return _adapter(type(obj)).dump_python(obj, by_alias=True)


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file's contents, or a :class:`ConfigError` saying why the ``what`` cannot be read."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys (``{"dp": {"delta": 1e-5}}`` -> ``{"dp.delta": 1e-5}``), as Flower flattens TOML."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The inverse of :func:`flatten`; a key that is both a value and a table is a :class:`ConfigError`."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *groups, name = key.split(".")
        table = nested
        for group in groups:
            table = table.setdefault(group, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{what} key {key!r} puts a key under {group!r}, which is a value")
        if isinstance(table.get(name), dict):
            raise ConfigError(f"{what} key {key!r} is a table of keys ({name}.*), not a value")
        table[name] = value
    return nested


# ---------------------------------------------------------------------- errors
def config_error(exc: ValidationError, cls: Any, where: str | Path = "", prefix: str = "") -> ConfigError:
    """One line for pydantic's first error: the file, the key, what it accepts, the value given."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    what = getattr(cls, "__fedvox_what__", "setting")
    loc = tuple(str(part) for part in first["loc"])
    key = prefix + ".".join(_name(cls, loc[: i + 1]) for i in range(len(loc)))
    message = _describe(first, cls, loc, what, key)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ConfigError(f"{where}: {message}" if where else message)


_TYPES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a table",
    "dataclass": "a table",
    "mapping": "a table",
    "tuple": "a list",
    "list": "a list",
}


def _describe(error: Any, cls: Any, loc: tuple[str, ...], what: str, key: str) -> str:
    kind, got = error["type"], error.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = _keys(cls, loc[:-1])
        return f"unknown {what} key {key!r}" + (f"; known keys: {', '.join(known)}" if known else "")
    field = _walk(cls, loc)[0]
    hint = f" ({field.description})" if field is not None and field.description else ""
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        return f"{what} needs {key}{hint}"
    if kind == "too_short":
        return f"{what} {key} must not be empty{hint}"
    if kind == "accepts":
        return f"{what} {key} {error['msg']}, got {got!r}"
    if kind == "value_error":  # a check across keys: its message names them
        reason = str(error["ctx"]["error"])
        return f"{what} {key}: {reason}" if loc else f"{what}: {reason}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{what} {key} must be {_bounds(field, error['ctx'])}{hint}, got {got!r}"
    base, _, tail = kind.partition("_")
    if base in _TYPES and tail in ("type", "exact_type", "parsing", "from_float"):
        return f"{what} {key} must be {_TYPES[base]}{hint}, got {got!r}"
    return f"{what} {key}: {error['msg']}, got {got!r}"


_LOWER = {annotated_types.Gt: ("(", "gt"), annotated_types.Ge: ("[", "ge")}
_UPPER = {annotated_types.Lt: (")", "lt"), annotated_types.Le: ("]", "le")}
_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds(field: FieldInfo | None, violated: Mapping[str, Any]) -> str:
    """The whole accepted range (``in (0, 1]``), not only the bound that was crossed."""
    lower = upper = ""
    for item in field.metadata if field is not None else ():
        if type(item) in _LOWER:
            bracket, name = _LOWER[type(item)]
            lower = f"{bracket}{getattr(item, name):g}"
        elif type(item) in _UPPER:
            bracket, name = _UPPER[type(item)]
            upper = f"{getattr(item, name):g}{bracket}"
    if lower and upper:
        return f"in {lower}, {upper}"
    name, bound = next(iter(violated.items()))
    return f"{_SIGNS[name]} {bound:g}"


def _walk(cls: Any, loc: tuple[str, ...]) -> tuple[FieldInfo | None, Any]:
    """The field ``loc`` names and its type, following nested settings and tables of settings
    (``dict[str, X]``, whose keys are names, not fields)."""
    field: FieldInfo | None = None
    kind: Any = cls
    for part in loc:
        kind = _unwrap(kind)
        fields = getattr(kind, "__pydantic_fields__", None)
        if fields is None:
            items = [arg for arg in get_args(kind) if arg is not Ellipsis]  # dict[str, X], tuple[X, ...]
            field, kind = None, (items[-1] if items else None)
            continue
        by_position = list(fields.values())[int(part)] if part.isdigit() and int(part) < len(fields) else None
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), by_position)
        if field is None:
            return None, None
        kind = field.annotation
    return field, kind


def _name(cls: Any, loc: tuple[str, ...]) -> str:
    """How a file writes the last key of ``loc``: a field's alias, else the key as given."""
    field = _walk(cls, loc)[0]
    return field.alias if field is not None and field.alias else loc[-1]


def _keys(cls: Any, table: tuple[str, ...]) -> list[str]:
    """The keys known in ``table`` (where an unknown key was found)."""
    fields = getattr(_unwrap(_walk(cls, table)[1]), "__pydantic_fields__", {})
    return [field.alias or name for name, field in fields.items()]


def _unwrap(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(kind) in (Union, types.UnionType):
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    return kind


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    """pydantic's validator of ``cls``, built once."""
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


__all__ = [
    "accepts",
    "choice",
    "config_error",
    "dump",
    "flatten",
    "kebab",
    "parse",
    "read_toml",
    "settings",
    "unflatten",
]
