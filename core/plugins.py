"""Loading plugins through the ``convnet`` entry-point group, the built-ins included."""
from __future__ import annotations

import importlib.metadata as md
import warnings

import pluggy

from convnet.core import hookspecs
from convnet.core.errors import ConvnetError, PluginError
from convnet.core.registry import Registries

GROUP = "convnet"
OWN_DISTRIBUTION = "convnet"


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the others still were."""


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=GROUP)
    # One distribution can be seen twice (an editable install plus a stale egg-info);
    # keep the first of each (name, value) so that nothing registers twice by accident.
    seen: set[tuple[str, str]] = set()
    unique = []
    for ep in eps:
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    return unique


def _dist_name(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "<unknown distribution>"


def create_manager(strict: bool = False) -> tuple[pluggy.PluginManager, Registries]:
    """Load every plugin of the group and fill fresh registries.

    A plugin that fails to import or to register is reported (with its entry point and
    distribution) and skipped; with ``strict`` it is an error instead.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registries = Registries()
    dists: dict[str, str] = {}
    for ep in _entry_points():
        dist = _dist_name(ep)
        try:
            module = ep.load()
            if pm.is_registered(module):
                continue
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take the rest down
            _problem(registries, strict,
                     f"plugin {ep.name!r} ({ep.value}, distribution {dist}) failed to import: "
                     f"{type(exc).__name__}: {exc}")
            continue
        dists[ep.name] = dist
    # convnet's own plugins first, then the others by name: a third party can never take a
    # built-in name (its registration is the one refused), whatever the order of sys.path.
    impls = sorted(pm.hook.convnet_register.get_hookimpls(),
                   key=lambda i: (dists.get(i.plugin_name, "").split(" ")[0] != OWN_DISTRIBUTION, i.plugin_name))
    for impl in impls:
        name = impl.plugin_name
        registries.current_plugin = (name, dists.get(name, "<registered directly>"))
        try:
            impl.function(registries=registries)
        except Exception as exc:
            registries.discard_plugin(name)  # a plugin is loaded whole or not at all
            _problem(registries, strict, str(exc) if isinstance(exc, ConvnetError) else
                     f"plugin {name!r} (distribution {dists.get(name)}) failed while registering: "
                     f"{type(exc).__name__}: {exc}")
    registries.current_plugin = ("<none>", "<none>")
    return pm, registries


def _problem(registries: Registries, strict: bool, message: str) -> None:
    if strict:
        raise PluginError(message)
    registries.problems.append(message)
    warnings.warn(message, PluginWarning, stacklevel=3)


_STATE: dict[str, object] = {}


def manager(strict: bool = False) -> pluggy.PluginManager:
    return _load(strict)[0]


def registries(strict: bool = False) -> Registries:
    return _load(strict)[1]


def _load(strict: bool) -> tuple[pluggy.PluginManager, Registries]:
    key = "strict" if strict else "lenient"
    if key not in _STATE:
        _STATE[key] = create_manager(strict)
    return _STATE[key]  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded plugins (after installing one, or in tests)."""
    _STATE.clear()
