"""Recipes: TOML files structured by cattrs into the attrs classes of ``schema``.

A recipe is data. It names registered components and never imports or runs anything.
Every error names the path to the bad value, what was expected and what was found.
"""
from __future__ import annotations

import copy
import difflib
import importlib.resources
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

import attrs
import cattrs
import tomli_w
from cattrs.cols import is_sequence, list_structure_factory
from cattrs.errors import (AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError,
                           IterableValidationError)

from convnet.core import schema
from convnet.core.errors import RecipeError
from convnet.core.registry import Registries

MAX_EXTENDS_DEPTH = 16


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _strict_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, found {_show(value)}")
    return value


def _strict_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, found {_show(value)}")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"expected a number that fits a float, found {_show(value)}") from None
    if not math.isfinite(result):
        raise ValueError(f"expected a finite number, found {_show(value)}")
    return result


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, found {_show(value)}")
    return value


def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, found {_show(value)}")
    return value


def _strict_list_factory(type_: Any, converter: cattrs.Converter) -> Any:
    inner = list_structure_factory(type_, converter)

    def structure(value: Any, t: Any) -> list:
        if not isinstance(value, list):
            raise ValueError(f"expected an array, found {_show(value)}")
        return inner(value, t)

    return structure


def _failing_field(cls: type, value: dict[str, Any]) -> attrs.Attribute | None:
    """The field whose validator rejects its raw value (attrs names only the class)."""
    for field in attrs.fields(cls):
        key = field.alias or field.name
        if field.validator is None or key not in value:
            continue
        try:
            field.validator(None, field, value[key])
        except Exception:  # noqa: BLE001 - any complaint of the validator is the one we want
            return field
    return None


def _structure_validated(structure_fn: Any, value: Any, cls: type) -> Any:
    """Structure an attrs class; a validator's ValueError gets the field's path like a type error."""
    try:
        return structure_fn(value, cls)
    except ClassValidationError as group:
        field = _failing_field(cls, value) if isinstance(value, dict) else None
        if field is not None:
            for exc in group.exceptions:
                if isinstance(exc, (ValueError, TypeError)) and not any(
                        isinstance(n, AttributeValidationNote) for n in getattr(exc, "__notes__", ())):
                    exc.add_note(AttributeValidationNote(
                        f"Structuring class {cls.__qualname__} @ attribute {field.name}", field.name, field.type))
        raise


def _is_component(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, schema.Component)


def make_converter(registries: Registries) -> cattrs.Converter:
    """A converter that is strict about types and validates component options."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook_factory(is_sequence, _strict_list_factory)

    def structure_component(value: Any, type_: type[schema.Component]) -> schema.Component:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table with a {_key(type_)!r}, found {_show(value)}")
        value = dict(value)
        key = _key(type_)
        if key not in value:
            raise ValueError(f"missing {key!r}: name one of the registered {type_.kind}s "
                             f"({', '.join(registries[type_.kind].names())})")
        name = value.pop(key)
        if not isinstance(name, str):
            raise ValueError(f"{key!r}: expected a string, found {_show(name)}")
        entry = registries[type_.kind].get(name)
        extra: dict[str, Any] = {}
        if type_ is schema.Layer:
            for field in ("id", "towers"):
                if field in value:
                    extra[field] = value.pop(field)
            try:
                if "id" in extra:
                    field = "id"
                    extra["id"] = _strict_str(extra["id"], str)
                    if not extra["id"].isidentifier():
                        raise ValueError(f"expected a name made of letters, digits and _, found {extra['id']!r}")
                if "towers" in extra:
                    field = "towers"
                    extra["towers"] = _strict_str(extra["towers"], str)
                    schema._towers_choice(None, None, extra["towers"])
            except ValueError as exc:
                exc.add_note(AttributeValidationNote(f"Structuring class Layer @ attribute {field}", field, str))
                raise ClassValidationError("While structuring Layer", [exc], type_) from None
        options = _structure_validated(conv.structure, value, entry.options)
        return type_(name, options, **extra) if extra else type_(name, options)

    conv.register_structure_hook_func(_is_component, structure_component)

    def structure_attrs_checked(value: Any, type_: type) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, found {_show(value)}")
        return _structure_validated(plain_hooks[type_], value, type_)

    plain_hooks: dict[type, Any] = {}
    for cls in (schema.Model, schema.Data, schema.Train, schema.Plugins, schema.Recipe):
        plain_hooks[cls] = conv.get_structure_hook(cls)
        conv.register_structure_hook(cls, structure_attrs_checked)


    def unstructure_component(component: schema.Component) -> dict[str, Any]:
        out: dict[str, Any] = {_key(type(component)): component.name}
        if isinstance(component, schema.Layer):
            if component.id is not None:
                out["id"] = component.id
            out["towers"] = component.towers
        if component.options is not None:
            out.update(conv.unstructure(component.options))
        return out

    conv.register_unstructure_hook_func(_is_component, unstructure_component)
    return conv


def _key(type_: type[schema.Component]) -> str:
    return getattr(type_, "key", "name")


def format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = sorted(a.name for a in attrs.fields(exc.cl)) if attrs.has(exc.cl) else []
        extra = sorted(exc.extra_fields)
        close = [m for k in extra for m in difflib.get_close_matches(k, allowed, n=1)]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}{hint} (allowed: {', '.join(allowed)})"
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, (ValueError, TypeError, RecipeError)):
        # attrs' in_ validator passes (message, attribute, options, value) as its arguments
        return exc.args[0] if len(exc.args) > 1 and isinstance(exc.args[0], str) else str(exc)
    return f"{type(exc).__name__}: {exc}"


def _errors(exc: BaseException, source: str) -> RecipeError:
    lines = cattrs.transform_error(exc, path="$", format_exception=format_exception)
    pretty = []
    for line in lines:
        message, _, path = line.rpartition(" @ ")
        path = path.removeprefix("$").removeprefix(".") or "(top level)"
        pretty.append(f"{path}: {message}")
    head = f"{source}: " if source else ""
    if len(pretty) == 1:
        return RecipeError(head + pretty[0])
    return RecipeError(head + "; ".join(pretty))


# ---------------------------------------------------------------- finding and merging

def bundled_names() -> list[str]:
    root = importlib.resources.files("convnet.recipes")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: not valid TOML: {exc}") from None


def locate(ref: str, relative_to: Path | None = None) -> tuple[str, str, Path | None]:
    """Return (text, source label, path or None for a bundled recipe) for a name or path."""
    candidates = []
    if relative_to is not None:
        candidates.append(relative_to / ref)
    candidates.append(Path(ref))
    for path in candidates:
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8"), str(path), path
            except (OSError, UnicodeDecodeError) as exc:
                raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    names = bundled_names()
    if ref in names:
        res = importlib.resources.files("convnet.recipes") / f"{ref}.toml"
        return res.read_text(encoding="utf-8"), f"{ref} (bundled)", None
    if ref.endswith(".toml") or "/" in ref:
        raise RecipeError(f"{ref}: no such recipe file")
    close = difflib.get_close_matches(ref, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"unknown recipe {ref!r}{hint} (bundled: {', '.join(names)}; or give a path to a .toml file)")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (arrays included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(ref: str, relative_to: Path | None = None, _depth: int = 0) -> tuple[dict[str, Any], str]:
    """The recipe as a plain dict with ``extends`` resolved, and its default name."""
    text, source, path = locate(ref, relative_to)
    raw = _read_toml(text, source)
    name = path.stem if path is not None else ref
    if "extends" in raw:
        parent = raw.pop("extends")
        if not isinstance(parent, str):
            raise RecipeError(f"{source}: extends: expected a recipe name or path, found {_show(parent)}")
        if _depth >= MAX_EXTENDS_DEPTH:
            raise RecipeError(f"{source}: extends: more than {MAX_EXTENDS_DEPTH} levels (a cycle?)")
        try:  # an unknown parent is this file's error: name it
            locate(parent, path.parent if path is not None else None)
        except RecipeError as exc:
            raise RecipeError(f"{source}: extends: {exc}") from None
        base, _ = load_raw(parent, path.parent if path is not None else None, _depth + 1)
        base.pop("name", None)
        base.pop("description", None)
        raw = merge(base, raw)
    return raw, name


# ---------------------------------------------------------------- --set overrides

def parse_path(path: str) -> list[str | int]:
    """``model.layers[2].alpha`` -> ["model", "layers", 2, "alpha"]."""
    parts: list[str | int] = []
    for piece in path.split("."):
        if not piece:
            raise RecipeError(f"--set {path}: empty key")
        name, _, rest = piece.partition("[")
        if name:
            parts.append(name)
        while rest:
            index, _, rest = rest.partition("]")
            if not index.isdigit():
                raise RecipeError(f"--set {path}: expected a list index in [...], found {index!r}")
            parts.append(int(index))
            rest = rest.removeprefix("[")
    return parts


def parse_value(text: str) -> Any:
    """A TOML value (``64``, ``0.1``, ``true``, ``["cpu", "cpu"]``) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep:
        raise RecipeError(f"--set {assignment}: expected KEY=VALUE")
    parts = parse_path(key.strip())
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = _fmt_path(parts[: depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"--set {key}: {where} does not exist")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {_fmt_path(parts[:depth])} is not a table")
            node = node.setdefault(part, {})
    last = parts[-1]
    value = parse_value(text.strip())
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {key}: {_fmt_path(parts)} does not exist")
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {_fmt_path(parts[:-1])} is not a table")
        node[last] = value


def _fmt_path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "(top level)"


# ---------------------------------------------------------------- structuring

def structure(raw: dict[str, Any], registries: Registries, source: str = "") -> schema.Recipe:
    conv = make_converter(registries)
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a table at the top level")
    try:
        recipe = conv.structure(raw, schema.Recipe)
    except (ClassValidationError, IterableValidationError) as exc:
        raise _errors(exc, source) from None
    except (ValueError, TypeError, RecipeError) as exc:
        raise RecipeError(f"{source}: {exc}") from None
    _fill_default_options(recipe, registries, source)
    return recipe


def _fill_default_options(recipe: schema.Recipe, registries: Registries, source: str) -> None:
    for path, comp in iter_components(recipe):
        if comp.options is None:
            try:
                entry = registries[comp.kind].get(comp.name, path)
            except RecipeError as exc:
                raise RecipeError(f"{source}: {exc}") from None
            comp.options = entry.options()


def iter_components(recipe: schema.Recipe) -> typing.Iterator[tuple[str, schema.Component]]:
    yield "data.dataset", recipe.data.dataset
    for i, c in enumerate(recipe.data.train_augment):
        yield f"data.train_augment[{i}]", c
    for i, c in enumerate(recipe.data.eval_augment):
        yield f"data.eval_augment[{i}]", c
    yield "train.optimizer", recipe.train.optimizer
    yield "train.schedule", recipe.train.schedule
    yield "parallel", recipe.parallel
    for i, c in enumerate(recipe.evaluate):
        yield f"evaluate[{i}]", c
    for i, c in enumerate(recipe.model.layers):
        yield f"model.layers[{i}]", c


def unstructure(recipe: schema.Recipe, registries: Registries) -> dict[str, Any]:
    return _drop_none(make_converter(registries).unstructure(recipe))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def to_toml(recipe: schema.Recipe, registries: Registries) -> str:
    return tomli_w.dumps(unstructure(recipe, registries))


def load_recipe(ref: str | Path, overrides: typing.Sequence[str] = (), registries: Registries | None = None,
                validate_model: bool = True) -> schema.Recipe:
    """Load a bundled recipe by name or a recipe file by path, apply ``--set`` overrides.

    With ``validate_model`` the layer list is checked for fitting shapes (on the meta
    device, allocating nothing) so that a bad network fails here, before any data is read.
    """
    from convnet.core import plugins

    regs = registries if registries is not None else plugins.registries()
    raw, name = load_raw(str(ref))
    for assignment in overrides:
        apply_override(raw, assignment)
    raw.setdefault("name", name)
    source = str(ref) + (" (with --set overrides)" if overrides else "")
    recipe = structure(raw, regs, source)
    if validate_model:
        from convnet.core.model import build_model

        try:
            build_model(recipe, device="meta", registries=regs)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
    return recipe


def recipe_from_text(text: str, registries: Registries | None = None, source: str = "<recipe>") -> schema.Recipe:
    """Structure a resolved recipe (as saved in a run folder or checkpoint)."""
    from convnet.core import plugins

    regs = registries if registries is not None else plugins.registries()
    return structure(_read_toml(text, source), regs, source)


# ---------------------------------------------------------------- may a checkpoint resume this recipe

# What a resume may change without changing the run's result.
RESUME_MAY_CHANGE = {"name", "description", "train.epochs", "train.max_steps", "train.checkpoint_every",
                     "train.log_every", "parallel", "evaluate", "data.workers", "data.eval_batch_size",
                     "data.pin_memory", "data.augment_on", "plugins"}


def resume_difference(saved_toml: str, recipe: schema.Recipe, registries: Registries
                      ) -> tuple[str, Any, Any] | None:
    """The first value (path, checkpoint's, now) at which a checkpoint's recipe trains differently
    from ``recipe``, or None when resuming would continue the same run.

    Raises ``tomllib.TOMLDecodeError`` when ``saved_toml`` is not TOML.
    """
    return _first_difference(tomllib.loads(saved_toml), tomllib.loads(to_toml(recipe, registries)), "")


def _first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    if path in RESUME_MAY_CHANGE:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=lambda k: (k not in old, k)):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else (path or "(top level)", old, new)
