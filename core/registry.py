"""One registry per kind of component; an entry remembers which plugin supplied it."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator

import attrs

from convnet.core.errors import PluginError, RecipeError

KINDS = ("layer", "augmenter", "strategy", "evaluator", "dataset", "optimizer", "schedule", "lrn")


@attrs.frozen
class Entry:
    """A registered component: ``factory(options, ...)`` builds it from its attrs options."""

    kind: str
    name: str
    factory: Callable[..., Any]
    options: type
    description: str
    plugin: str
    distribution: str

    @property
    def origin(self) -> str:
        return f"plugin {self.plugin!r} (distribution {self.distribution})"


class Registry:
    """Components of one kind, by name."""

    def __init__(self, kind: str, owner: "Registries") -> None:
        self.kind = kind
        self._owner = owner
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, factory: Callable[..., Any], options: type, description: str = "") -> None:
        plugin, dist = self._owner.current_plugin
        if not isinstance(name, str) or not name:
            raise PluginError(f"{plugin} ({dist}) registered a {self.kind} with an empty or non-string name")
        if not attrs.has(options):
            raise PluginError(
                f"plugin {plugin!r} (distribution {dist}) registered {self.kind} {name!r} "
                f"with options {options!r}, which is not an attrs class"
            )
        if name in self._entries:
            first = self._entries[name]
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by {first.origin} "
                f"and by plugin {plugin!r} (distribution {dist})"
            )
        self._entries[name] = Entry(self.kind, name, factory, options, description, plugin, dist)

    def get(self, name: str, path: str = "") -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = f"{path}: " if path else ""
            raise RecipeError(
                f"{where}unknown {self.kind} {name!r}{hint} (known: {', '.join(known) or 'none'})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


class Registries:
    """All registries, plus the plugin currently registering (for attribution)."""

    def __init__(self) -> None:
        self.current_plugin: tuple[str, str] = ("<unknown>", "<unknown>")
        self.problems: list[str] = []
        for kind in KINDS:
            setattr(self, kind, Registry(kind, self))

    def __getitem__(self, kind: str) -> Registry:
        if kind not in KINDS:
            raise KeyError(kind)
        return getattr(self, kind)

    def discard_plugin(self, plugin: str) -> None:
        """Drop what ``plugin`` registered (it failed part-way: keep none of it)."""
        for _, registry in self.items():
            registry._entries = {n: e for n, e in registry._entries.items() if e.plugin != plugin}

    def items(self) -> Iterator[tuple[str, Registry]]:
        for kind in KINDS:
            yield kind, self[kind]

    # type hints for the dynamic attributes
    layer: Registry
    augmenter: Registry
    strategy: Registry
    evaluator: Registry
    dataset: Registry
    optimizer: Registry
    schedule: Registry
    lrn: Registry
