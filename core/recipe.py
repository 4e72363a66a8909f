"""Recipes: TOML files structured by cattrs into the attrs classes of ``schema``.

A recipe is data. It names registered components and never imports or runs anything.
Every error names the path to the bad value, what was expected and what was found.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.resources
import tomllib
import typing
from pathlib import Path
from typing import Any

import attrs
import tomli_w
from cattrs.errors import ClassValidationError, IterableValidationError

from convnet.core import schema
from convnet.core.converter import make_converter, show, structure_error
from convnet.core.errors import RecipeError
from convnet.core.layer_edits import edit_layers, find_layer, pin_ids, raw_layer_ids
from convnet.core.registry import Registries

MAX_EXTENDS_DEPTH = 16
LAYERS = ("model", "layers")


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


@functools.cache
def component_tables(cls: type = schema.Recipe, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """The path of every component table in a recipe (arrays aside) and the key that names its plugin."""
    out: dict[tuple[str, ...], str] = {}
    for field in attrs.fields(attrs.resolve_types(cls)):
        path = (*prefix, field.name)
        if isinstance(field.type, type) and issubclass(field.type, schema.Component):
            out[path] = field.type.key
        elif attrs.has(field.type):
            out.update(component_tables(field.type, path))
    return out


def merge(base: dict[str, Any], over: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """A child recipe's data over its parent's.

    Tables merge key by key, except a component table naming another plugin than the parent's:
    that one replaces the parent's whole (another component brings its own options). Arrays
    are replaced; a table given for ``model.layers`` edits the parent's layers by id.
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        here = (*path, key)
        old = out.get(key)
        if here == LAYERS and isinstance(value, dict) and isinstance(old, list):
            out[key] = edit_layers(old, value)
        elif isinstance(value, dict) and isinstance(old, dict) and not _swaps_component(here, old, value):
            out[key] = merge(old, value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _swaps_component(path: tuple[str, ...], old: dict[str, Any], new: dict[str, Any]) -> bool:
    key = component_tables().get(path)
    return key is not None and key in new and new[key] != old.get(key)


def load_raw(ref: str, relative_to: Path | None = None, _depth: int = 0) -> tuple[dict[str, Any], str]:
    """The recipe as a plain dict with ``extends`` resolved, and its default name."""
    text, source, path = locate(ref, relative_to)
    raw = _read_toml(text, source)
    name = path.stem if path is not None else ref
    if "extends" in raw:
        parent = raw.pop("extends")
        if not isinstance(parent, str):
            raise RecipeError(f"{source}: extends: expected a recipe name or path, found {show(parent)}")
        if _depth >= MAX_EXTENDS_DEPTH:
            raise RecipeError(f"{source}: extends: more than {MAX_EXTENDS_DEPTH} levels (a cycle?)")
        try:  # an unknown parent is this file's error: name it
            locate(parent, path.parent if path is not None else None)
        except RecipeError as exc:
            raise RecipeError(f"{source}: extends: {exc}") from None
        try:
            base, _ = load_raw(parent, path.parent if path is not None else None, _depth + 1)
        except RecipeError as exc:  # a broken parent: say which recipe reached it, once
            if _depth:
                raise
            raise RecipeError(f"{source}: extends: {exc}") from None
        base.pop("name", None)
        base.pop("description", None)
        try:
            raw = merge(base, raw)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("layers"), dict):
        raise RecipeError(
            f"{source}: model.layers: a table edits the layers of a parent recipe by id, and "
            "there is none (no extends, or it has no layers): give an array of layers"
        )
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
    """``--set KEY=VALUE``: assign one value (a table value replaces the table whole).

    In ``model.layers`` a piece that is not an index names a layer id: ``model.layers.fc8.out``.
    """
    key, sep, text = assignment.partition("=")
    if not sep:
        raise RecipeError(f"--set {assignment}: expected KEY=VALUE")
    parts = parse_path(key.strip())
    node: Any = raw
    layers = raw.get("model", {}).get("layers") if isinstance(raw.get("model"), dict) else None
    edits_a_layer = tuple(parts[:2]) == LAYERS and len(parts) > 2 and isinstance(layers, list)
    ids_before = raw_layer_ids(layers) if edits_a_layer else []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(part, str) and isinstance(node, list) and tuple(parts[:depth]) == LAYERS:
            try:
                part = find_layer(node, part, _fmt_path(parts[: depth + 1]))
            except RecipeError as exc:
                raise RecipeError(f"--set {key}: {exc}") from None
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"--set {key}: {_fmt_path(parts[: depth + 1])} does not exist")
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {_fmt_path(parts[:depth])} is not a table")
        if depth == 2 and edits_a_layer:
            touched = part
        if last:
            node[part] = parse_value(text.strip())
        elif isinstance(part, int):
            node = node[part]
        else:
            node = node.setdefault(part, {})
    if edits_a_layer:
        # Ids stay with their layers: renaming relu3 to tanh must not make it tanh1 and shift
        # every later relu's id (a second --set by id would hit the wrong layer), and a layer
        # replaced as a table keeps its id unless the table gives one.
        assert isinstance(layers, list)
        explicit = (len(parts) == 4 and parts[3] == "id") or (
            len(parts) == 3 and isinstance(layers[touched], dict) and "id" in layers[touched]
        )
        wanted = list(ids_before)
        if explicit:
            wanted[touched] = raw_layer_ids(layers)[touched]
        pin_ids(list(zip(wanted, layers, strict=True)))


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
        raise structure_error(exc, source) from None
    except (ValueError, TypeError, RecipeError) as exc:
        raise RecipeError(f"{source}: {exc}") from None
    _fill_default_options(recipe, registries, source)
    _fill_last_out(recipe)
    return recipe


def _fill_last_out(recipe: schema.Recipe) -> None:
    """An option named ``out`` of the last layer, left unset, is ``model.num_classes``.

    Filled here, in the resolved recipe, so that ``convnet show``, the run folder's recipe.toml
    and every checkpoint state the width explicitly.
    """
    last = recipe.model.layers[-1]
    options = last.options
    if attrs.has(type(options)) and "out" in attrs.fields_dict(type(options)) and options.out is None:
        last.options = attrs.evolve(options, out=recipe.model.num_classes)


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
    raw = _drop_none(make_converter(registries).unstructure(recipe))
    if raw.get("plugins") == {"disable": []}:  # the default: resolved recipes (and checkpoints) stay as before
        del raw["plugins"]
    return raw


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def to_toml(recipe: schema.Recipe, registries: Registries) -> str:
    return tomli_w.dumps(unstructure(recipe, registries))


def load_recipe(
    ref: str | Path,
    overrides: typing.Sequence[str] = (),
    registries: Registries | None = None,
    validate_model: bool = True,
) -> schema.Recipe:
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
    try:
        recipe = structure(raw, regs, source)
    except RecipeError as exc:  # the same error, its attributes kept (a missing plugin's names)
        hint = _swap_hint(str(exc), overrides)
        if hint:
            exc.args = (f"{exc}{hint}",)
        raise
    if validate_model:
        from convnet.core.model import build_model

        try:
            build_model(recipe, device="meta", registries=regs)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
    return recipe


def _swap_hint(message: str, overrides: typing.Sequence[str]) -> str:
    """When ``--set TABLE.name=...`` left the old component's keys that the new one rejects: how
    to swap a component whole (``--set`` assigns one key; a child recipe's rule does not apply)."""
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        table = key.removesuffix(".name")
        if table != key and f"{table}: unknown key" in message:
            return (
                f"; --set {key}=... keeps {table}'s other keys: to swap the component, assign the "
                f"whole table, e.g. --set '{table}={{name = \"...\", ...}}'"
            )
    return ""


def recipe_from_text(text: str, registries: Registries | None = None, source: str = "<recipe>") -> schema.Recipe:
    """Structure a resolved recipe (as saved in a run folder or checkpoint)."""
    from convnet.core import plugins

    regs = registries if registries is not None else plugins.registries()
    return structure(_read_toml(text, source), regs, source)


# ---------------------------------------------------------------- may a checkpoint resume this recipe

# What a resume may change without changing the run's result (compile and channels_last change
# only the rounding: a resume that switches them is not bit-exact).
RESUME_MAY_CHANGE = {
    "name",
    "description",
    "train.epochs",
    "train.max_steps",
    "train.checkpoint_every",
    "train.log_every",
    "parallel",
    "evaluate",
    "data.workers",
    "data.eval_batch_size",
    "data.pin_memory",
    "data.augment_on",
    "plugins",
    "train.compile",
    "train.compile_mode",
    "train.channels_last",
    "train.reuse_cpu_memory",
}


def resume_difference(saved_toml: str, recipe: schema.Recipe, registries: Registries) -> tuple[str, Any, Any] | None:
    """The first value (path, checkpoint's, now) at which a checkpoint's recipe trains differently
    from ``recipe``, or None when resuming would continue the same run.

    The checkpoint's recipe is read by today's converter first, so an option added since it was
    saved holds its default on both sides (a new option's default keeps the old behaviour). What a
    resume may change is taken from ``recipe`` for that reading, so a part of it that cannot be
    read here (a CUDA device on a CPU machine, an evaluator or plugin no longer installed) does not
    keep the rest from being read; a recipe that still cannot be read is compared as saved.

    Raises ``tomllib.TOMLDecodeError`` when ``saved_toml`` is not TOML.
    """
    now = tomllib.loads(to_toml(recipe, registries))
    saved = tomllib.loads(saved_toml)
    try:
        readable = structure(_with_changeable_parts_of(saved, now), registries, "<checkpoint recipe>")
        saved = tomllib.loads(to_toml(readable, registries))
    except RecipeError:
        pass
    return _first_difference(saved, now, "")


def _with_changeable_parts_of(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with each path of RESUME_MAY_CHANGE as ``now`` has it (or absent, as there)."""
    out = copy.deepcopy(saved)
    for path in RESUME_MAY_CHANGE:
        *parents, leaf = path.split(".")
        target, source = out, now
        for part in parents:
            target = target.get(part) if isinstance(target, dict) else None
            source = source.get(part) if isinstance(source, dict) else None
        if not isinstance(target, dict):
            continue
        if isinstance(source, dict) and leaf in source:
            target[leaf] = copy.deepcopy(source[leaf])
        else:
            target.pop(leaf, None)
    return out


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
