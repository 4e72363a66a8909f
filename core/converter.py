"""The cattrs converter that turns a recipe's plain data into ``schema`` classes and back.

Built, like cattrs' own preconf converters, from small ``configure_*`` steps, each one job:

- ``configure_strict_scalars``: an integer is not a bool, a string is not a number, an array
  is an array (cattrs would coerce them; a recipe with ``epochs = "2"`` is a mistake).
- ``configure_components``: a component table's registry key (``name``, or ``strategy`` for
  ``[parallel]``) picks the registered plugin, whose attrs class structures the other keys;
  a component class's own fields (a layer's ``id`` and ``towers``) are checked by the
  schema's validators.
- ``configure_checked_classes``: a validator's complaint (``train.epochs = 0``) names the
  field's path like a type error does (attrs names only the class).

The order matters: cattrs bakes the hooks registered so far into the ones it generates.
Errors become one ``RecipeError`` line through ``structure_error``.
"""

from __future__ import annotations

import difflib
import functools
import math
import typing
from collections.abc import Callable
from typing import Any

import attrs
import cattrs
from cattrs.cols import is_sequence, list_structure_factory
from cattrs.errors import AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError

from convnet.core import schema
from convnet.core.errors import RecipeError
from convnet.core.registry import Registries

# The attrs classes of the recipe itself (components are structured by their own hook).
SECTIONS: tuple[type, ...] = (schema.Model, schema.Data, schema.Train, schema.Plugins, schema.Recipe)


def make_converter(registries: Registries) -> cattrs.Converter:
    """A converter that is strict about types and validates every component's options."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    configure_strict_scalars(conv)
    configure_components(conv, registries)
    configure_checked_classes(conv, SECTIONS)
    return conv


def show(value: Any) -> str:
    """A value as an error message quotes it: its repr, shortened, and its TOML-ish type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# ---------------------------------------------------------------- strict scalars


def strict_int(value: Any, _: Any = int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, found {show(value)}")
    if not -(2**63) <= value < 2**63:  # TOML's integers are 64-bit; Python's reader does not check
        raise ValueError(f"expected an integer that fits 64 bits, found {value}")
    return value


def strict_float(value: Any, _: Any = float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, found {show(value)}")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"expected a number that fits a float, found {show(value)}") from None
    if not math.isfinite(result):
        raise ValueError(f"expected a finite number, found {show(value)}")
    return result


def strict_bool(value: Any, _: Any = bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, found {show(value)}")
    return value


def strict_str(value: Any, _: Any = str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, found {show(value)}")
    return value


def _strict_list_factory(type_: Any, converter: cattrs.Converter) -> Callable[[Any, Any], list]:
    inner = list_structure_factory(type_, converter)

    def structure(value: Any, t: Any) -> list:
        if not isinstance(value, list):
            raise ValueError(f"expected an array, found {show(value)}")
        return inner(value, t)

    return structure


def configure_strict_scalars(conv: cattrs.Converter) -> None:
    """int, float, bool, str and arrays are taken only as themselves (an int is a float too)."""
    conv.register_structure_hook(int, strict_int)
    conv.register_structure_hook(float, strict_float)
    conv.register_structure_hook(bool, strict_bool)
    conv.register_structure_hook(str, strict_str)
    conv.register_structure_hook_factory(is_sequence, _strict_list_factory)


# ---------------------------------------------------------------- validators with paths


def _failing_field(cls: type, value: dict[str, Any]) -> attrs.Attribute | None:
    """The field whose validator rejects its raw value (attrs names only the class)."""
    for field in attrs.fields(cls):
        key = field.alias or field.name
        if field.validator is None or key not in value:
            continue
        try:
            field.validator(None, field, value[key])
        except Exception:
            return field
    return None


def _note_field(exc: Exception, cls: type, field: attrs.Attribute) -> Exception:
    exc.add_note(
        AttributeValidationNote(
            f"Structuring class {cls.__qualname__} @ attribute {field.name}", field.name, field.type
        )
    )
    return exc


def structure_validated(structure_fn: Callable[[Any, type], Any], value: Any, cls: type) -> Any:
    """Structure an attrs class; a validator's ValueError gets the field's path like a type error."""
    try:
        return structure_fn(value, cls)
    except ClassValidationError as group:
        field = _failing_field(cls, value) if isinstance(value, dict) else None
        if field is not None:
            for exc in group.exceptions:
                if isinstance(exc, (ValueError, TypeError)) and not any(
                    isinstance(n, AttributeValidationNote) for n in getattr(exc, "__notes__", ())
                ):
                    _note_field(exc, cls, field)
        raise


def configure_checked_classes(conv: cattrs.Converter, classes: tuple[type, ...]) -> None:
    """Each class must be given as a table, and its validators' complaints name their field."""
    for cls in classes:
        generated = conv.get_structure_hook(cls)

        def structure(value: Any, type_: type, generated: Callable[[Any, type], Any] = generated) -> Any:
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, found {show(value)}")
            return structure_validated(generated, value, type_)

        conv.register_structure_hook(cls, structure)


# ---------------------------------------------------------------- components


def is_component(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, schema.Component)


@functools.cache
def own_fields(type_: type[schema.Component]) -> tuple[attrs.Attribute, ...]:
    """A component class's fields besides its name and options (a layer's ``id`` and ``towers``)."""
    attrs.resolve_types(type_)
    return tuple(f for f in attrs.fields(type_) if f.name not in ("name", "options"))


def _structure_own_fields(
    conv: cattrs.Converter, type_: type[schema.Component], table: dict[str, Any]
) -> dict[str, Any]:
    """Pop and check the component class's own keys from ``table``, through the schema's validators."""
    values: dict[str, Any] = {}
    errors: list[Exception] = []
    for field in own_fields(type_):
        if field.name not in table:
            continue
        try:
            values[field.name] = conv.structure(table.pop(field.name), field.type)
            if field.validator is not None:
                field.validator(None, field, values[field.name])
        except ValueError as exc:
            errors.append(_note_field(exc, type_, field))
    if errors:
        raise ClassValidationError(f"While structuring {type_.__name__}", errors, type_)
    return values


def configure_components(conv: cattrs.Converter, registries: Registries) -> None:
    """A component table: its registry key names the plugin; the plugin's class takes the rest."""

    def structure(value: Any, type_: type[schema.Component]) -> schema.Component:
        key = type_.key
        if not isinstance(value, dict):
            raise ValueError(f"expected a table with a {key!r}, found {show(value)}")
        table = dict(value)
        if key not in table:
            raise ValueError(
                f"missing {key!r}: name one of the registered {type_.kind}s "
                f"({', '.join(registries[type_.kind].names())})"
            )
        name = table.pop(key)
        if not isinstance(name, str):
            raise ValueError(f"{key!r}: expected a string, found {show(name)}")
        entry = registries[type_.kind].get(name)
        own = _structure_own_fields(conv, type_, table)
        options = structure_validated(conv.structure, table, entry.options)
        return type_(name, options, **own)

    def unstructure(component: schema.Component) -> dict[str, Any]:
        out: dict[str, Any] = {component.key: component.name}
        for field in own_fields(type(component)):
            value = getattr(component, field.name)
            if value is not None:  # TOML has no null: an unset id is left out
                out[field.name] = conv.unstructure(value)
        if component.options is not None:
            out.update(conv.unstructure(component.options))
        return out

    conv.register_structure_hook_func(is_component, structure)
    conv.register_unstructure_hook_func(is_component, unstructure)


# ---------------------------------------------------------------- errors as one line


def format_exception(exc: BaseException, type_: Any) -> str:
    """One error's message, without its path (``cattrs.transform_error`` adds that)."""
    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = sorted(a.name for a in attrs.fields(exc.cl)) if attrs.has(exc.cl) else []
        extra = sorted(exc.extra_fields)
        close = [m for k in extra for m in difflib.get_close_matches(k, allowed, n=1)]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listed = f"allowed: {', '.join(allowed)}" if allowed else "this component takes no options"
        return f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}{hint} ({listed})"
    if isinstance(exc, KeyError):
        return "required key missing"
    if typing.get_origin(type_) is typing.Literal:  # cattrs says "c not in literal typing.Literal['a', 'b']"
        allowed = ", ".join(repr(a) for a in typing.get_args(type_))
        value = str(exc).split(" not in literal ", 1)[0]
        return f"expected one of {allowed}, found {value!r}"
    if isinstance(exc, (ValueError, TypeError, RecipeError)):
        # attrs' in_ validator passes (message, attribute, options, value) as its arguments
        return exc.args[0] if len(exc.args) > 1 and isinstance(exc.args[0], str) else str(exc)
    return f"{type(exc).__name__}: {exc}"


# How the registry ends the message for an unknown component while some plugin failed to import.
MAY_PROVIDE = "; a plugin that failed to load may provide it: "


def structure_error(exc: BaseException, source: str) -> RecipeError:
    """cattrs' error tree as one ``RecipeError`` line: ``source: path: message; path: message``."""
    lines = cattrs.transform_error(exc, path="$", format_exception=format_exception)
    pretty = []
    failed_plugins: dict[str, list[str]] = {}  # "plugin ... which failed to load: ..." -> components
    may_provide: list[str] = []
    for line in lines:
        message, _, path = line.rpartition(" @ ")
        path = path.removeprefix("$").removeprefix(".") or "(top level)"
        what, sep, origin = message.partition(" comes from plugin ")
        if sep and ", which failed to load: " in origin:  # said once for all its components
            if origin not in failed_plugins:
                pretty.append(origin)
            failed_plugins.setdefault(origin, []).append(f"{path} ({what})")
            continue
        unknown, sep, maybe = message.partition(MAY_PROVIDE)
        if sep:  # an import failure: any failed plugin may provide it; said once, at the end
            may_provide.append(maybe)
            message = unknown
        pretty.append(f"{path}: {message}")
    if may_provide:
        pretty.append(
            f"a plugin that failed to load may provide {'it' if len(may_provide) == 1 else 'them'}: {may_provide[0]}"
        )
    for origin, parts in failed_plugins.items():
        if len(parts) == 1:
            path, what = parts[0][:-1].split(" (", 1)
            said = f"{path}: {what} comes from plugin {origin}"
        else:
            said = f"{', '.join(parts)} come from plugin {origin}"
        pretty[pretty.index(origin)] = said
    head = f"{source}: " if source else ""
    error = RecipeError(head + "; ".join(pretty))
    # Components no plugin provides: a command can say where they came from.
    error.unknowns = list(dict.fromkeys(leaf.unknown for leaf in _leaves(exc) if getattr(leaf, "unknown", None)))
    if len(error.unknowns) == 1:
        error.unknown = error.unknowns[0]
    return error


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
