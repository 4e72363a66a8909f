"""Layers addressed by id in a recipe's plain data: ``--set model.layers.fc8.out=3`` and a child
recipe's table of layer edits.

A child recipe may give ``model.layers`` as a table keyed by layer id instead of an array;
each entry edits the parent's list:

- ``[model.layers.fc8] out = 3`` merges keys into layer ``fc8``; a different ``name``
  replaces the layer whole (another layer brings its own options);
- ``[model.layers.lrn1] remove = true`` removes it;
- a new id with ``after = "ID"`` or ``before = "ID"`` (and a ``name``) inserts a layer there;
  on an existing id, ``after``/``before`` move it.

Entries apply in the table's order; an anchor may name a layer inserted by an earlier entry,
and several layers inserted ``after`` the same anchor keep the table's order. Ids are stable:
a layer keeps the id it had in the parent even where removing or inserting layers would
shift its default id (``relu3`` after a ``relu`` is removed); the id is then written out.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from convnet.core import schema
from convnet.core.converter import show
from convnet.core.errors import RecipeError

EDIT_KEYS = ("remove", "after", "before")


def raw_layer_ids(layers: list[Any]) -> list[str]:
    """The ids of a plain layer list, by the same rule as the model (``schema.layer_ids``).

    A malformed entry counts as a nameless layer here; structuring reports it with its path.
    """

    def pair(layer: Any) -> tuple[str, str | None]:
        if not isinstance(layer, dict):
            return "", None
        name, given = layer.get("name"), layer.get("id")
        return (name if isinstance(name, str) else "", given if isinstance(given, str) else None)

    return schema.layer_ids(pair(layer) for layer in layers)


def unknown_id(where: str, wanted: str, ids: list[str], hint: str = "") -> RecipeError:
    close = difflib.get_close_matches(wanted, ids, n=1)
    mean = f"; did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"{where}: no layer with id {wanted!r}{mean} ({hint}ids: {', '.join(ids)})")


def find_layer(layers: list[Any], layer_id: str, where: str) -> int:
    """The index of the layer with this id (``where`` is the path the error names)."""
    ids = raw_layer_ids(layers)
    if layer_id not in ids:
        raise unknown_id(where, layer_id, ids)
    return ids.index(layer_id)


def edit_layers(layers: list[Any], edits: dict[str, Any], path: str = "model.layers") -> list[Any]:
    """The parent's layer list with a child's table of edits applied (see the module docstring)."""
    entries = [(i, copy.deepcopy(layer)) for i, layer in zip(raw_layer_ids(layers), layers, strict=True)]
    chained: dict[str, str] = {}  # anchor -> the last layer inserted after it
    for key, edit in edits.items():
        where = f"{path}.{key}"
        if not isinstance(edit, dict):
            raise RecipeError(f"{where}: expected a table (the layer's keys, or remove = true), found {show(edit)}")
        edit = copy.deepcopy(edit)
        stated = sorted(k for k in edit if k not in ("remove", "id"))
        remove, anchor = _edit_keys(edit, where)
        if edit.get("id", key) != key:
            raise RecipeError(f"{where}.id: the table's key is the layer's id; found id = {edit['id']!r}")
        edit.pop("id", None)
        ids = [i for i, _ in entries]
        if key in ids:
            position = ids.index(key)
            if remove:
                if stated:
                    raise RecipeError(f"{where}: remove = true takes no other keys, found {', '.join(stated)}")
                del entries[position]
                continue
            layer = entries[position][1]
            if not isinstance(layer, dict):
                raise RecipeError(f"{where}: the parent's layer is not a table, found {show(layer)}")
            if "name" in edit and edit["name"] != layer.get("name"):
                layer = edit  # another layer: its own options
            else:
                layer.update(edit)
            entries[position] = (key, layer)
            if anchor is not None:  # a move
                del entries[position]
                _place(entries, key, layer, anchor, where, chained)
        elif remove or anchor is None:
            raise unknown_id(where, key, ids, "" if remove else 'a new layer needs after = "ID" or before = "ID"; ')
        elif "name" not in edit:
            raise RecipeError(f"{where}: a new layer needs a name (the registered layer it is)")
        else:
            _place(entries, key, edit, anchor, where, chained)
    return pin_ids(entries)


def _place(
    entries: list[tuple[str, Any]], key: str, layer: Any, anchor: tuple[str, str], where: str, chained: dict[str, str]
) -> None:
    """Insert ``layer`` before or after its anchor (after the layers inserted after it before)."""
    side, target = anchor
    if target == key:
        raise RecipeError(f"{where}.{side}: a layer cannot be placed {side} itself")
    ids = [i for i, _ in entries]
    if target not in ids:
        raise unknown_id(f"{where}.{side}", target, ids)
    if side == "before":
        entries.insert(ids.index(target), (key, layer))
        return
    last = chained.get(target)
    entries.insert(ids.index(last if last in ids else target) + 1, (key, layer))
    chained[target] = key


def _edit_keys(edit: dict[str, Any], where: str) -> tuple[bool, tuple[str, str] | None]:
    """Pop ``remove``, ``after`` and ``before``: (remove?, (side, anchor id) or None)."""
    remove = edit.pop("remove", False)
    if not isinstance(remove, bool):
        raise RecipeError(f"{where}.remove: expected true or false, found {show(remove)}")
    sides = [(side, edit.pop(side)) for side in ("after", "before") if side in edit]
    if len(sides) > 1:
        raise RecipeError(f"{where}: give after or before, not both")
    for side, target in sides:
        if not isinstance(target, str):
            raise RecipeError(f"{where}.{side}: expected a layer id, found {show(target)}")
    return remove, (sides[0] if sides else None)


def pin_ids(entries: list[tuple[str, Any]]) -> list[Any]:
    """The layers, each with its id written out where the default rule would now give another."""
    layers = [layer for _, layer in entries]
    for (wanted, layer), got in zip(entries, raw_layer_ids(layers), strict=True):
        if got != wanted and isinstance(layer, dict):
            layer["id"] = wanted
    return layers
