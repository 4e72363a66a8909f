"""One registry per kind of component; an entry remembers which plugin supplied it.

``Registry.build(component, path, ctx)`` is the one way a component is built: it finds the
entry, calls ``factory(options, ctx)``, checks what came back against the kind's contract and
turns the factory's ``ValueError`` into a ``RecipeError`` naming the recipe path.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from convnet.core.errors import ConvnetError, PluginError, RecipeError

if TYPE_CHECKING:
    from convnet.core.schema import Component

# Each kind, in the order `convnet plugins` lists them; docs/plugins.md has one section each.
KINDS = ("layer", "augmenter", "strategy", "evaluator", "dataset", "optimizer", "schedule", "lrn")


@attrs.frozen
class Entry:
    """A registered component: ``factory(options, ctx)`` builds it from its attrs options."""

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


@attrs.frozen
class FailedPlugin:
    """A plugin that could not be loaded, and what it had registered before it failed (if anything)."""

    name: str
    entry_point: str
    distribution: str
    error: str
    message: str
    attempted: tuple[tuple[str, str], ...] = ()


class Registry:
    """Components of one kind, by name."""

    def __init__(self, kind: str, owner: Registries) -> None:
        self.kind = kind
        self._owner = owner
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, factory: Callable[..., Any], options: type, description: str = "") -> None:
        """Register ``name``; ``options`` is the attrs class a recipe's table is structured into."""
        plugin, dist = self._owner.current_plugin
        self._owner.attempted.append((self.kind, name))
        if not isinstance(name, str) or not name:
            raise PluginError(f"{plugin} ({dist}) registered a {self.kind} with an empty or non-string name")
        if not attrs.has(options):
            raise PluginError(
                f"plugin {plugin!r} (distribution {dist}) registered {self.kind} {name!r} "
                f"with options {options!r}, which is not an attrs class"
            )
        if not callable(factory):
            raise PluginError(
                f"plugin {plugin!r} (distribution {dist}) registered {self.kind} {name!r} "
                f"with a factory that is not callable ({factory!r})"
            )
        if name in self._entries:
            first = self._entries[name]
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by {first.origin} "
                f"and by plugin {plugin!r} (distribution {dist})"
            )
        self._entries[name] = Entry(self.kind, name, factory, options, description, plugin, dist)

    def get(self, name: str, path: str = "") -> Entry:
        """The entry, or a ``RecipeError`` naming ``path``, the known names, the closest one, and a
        plugin that failed to load when it is the likely provider."""
        try:
            return self._entries[name]
        except KeyError:
            where = f"{path}: " if path else ""
            error = RecipeError(where + self._unknown(str(name)))
            error.unknown = (self.kind, str(name))  # lets a command add where the component came from
            raise error from None

    def _unknown(self, name: str) -> str:
        known = sorted(self._entries)
        listing = f"(known: {', '.join(known) or 'none'})"
        for failed in self._owner.failed:
            if (self.kind, name) in failed.attempted:
                return (
                    f"{self.kind} {name!r} comes from plugin {failed.name!r} (distribution "
                    f"{failed.distribution}), which failed to load: {failed.error}"
                )
        if self._owner.failed:  # an import failure: any of them may be the provider; never guess a name
            names = "; ".join(f.message for f in self._owner.failed)
            return f"unknown {self.kind} {name!r} {listing}; a plugin that failed to load may provide it: {names}"
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} {listing}"

    def build(self, component: Component, path: str, ctx: Any, returns: type | tuple[type, ...] | None = None) -> Any:
        """Build the recipe's ``component`` (found at ``path``) with ``factory(options, ctx)``.

        A ``ValueError`` from the factory is the recipe's fault: it becomes a ``RecipeError``
        naming ``path``; a ``ConvnetError`` passes as it is; any other exception is the plugin's
        fault: a ``PluginError`` naming the component, its plugin and the exception. With
        ``returns``, a result of another type is the plugin's fault too.
        """
        entry = self.get(component.name, f"{path}.{getattr(type(component), 'key', 'name')}")
        try:
            built = entry.factory(component.options, ctx)
        except ConvnetError:
            raise
        except ValueError as exc:
            raise RecipeError(f"{path}: {exc}") from None
        except Exception as exc:
            raise self.failed_in(entry, path, exc) from exc
        if returns is not None and not isinstance(built, returns):
            expected = returns.__name__ if isinstance(returns, type) else " or ".join(t.__name__ for t in returns)
            raise PluginError(
                f"{path}: {self.kind} {component.name!r} from {entry.origin} returned "
                f"{type(built).__name__}, not {expected}"
            )
        return built

    def failed_in(self, entry: Entry, path: str, exc: BaseException) -> PluginError:
        """The one-line error for a factory that raised ``exc`` (a bug in the plugin, not the recipe)."""
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        return PluginError(
            f"{path}: {self.kind} {entry.name!r} from {entry.origin} failed: {type(exc).__name__}"
            + (f": {reason}" if reason else "")
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


class Registries:
    """All registries, plus the plugin currently registering (for attribution) and the plugins
    that failed to load (``problems`` holds their one-line messages)."""

    def __init__(self) -> None:
        self.current_plugin: tuple[str, str] = ("<unknown>", "<unknown>")
        self.problems: list[str] = []
        self.failed: list[FailedPlugin] = []
        self.attempted: list[tuple[str, str]] = []
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

    def distributions(self) -> dict[str, str]:
        """Plugin name -> "distribution version" for every plugin that registered something."""
        return {e.plugin: e.distribution for _, reg in self.items() for e in reg}

    # type hints for the dynamic attributes
    layer: Registry
    augmenter: Registry
    strategy: Registry
    evaluator: Registry
    dataset: Registry
    optimizer: Registry
    schedule: Registry
    lrn: Registry
