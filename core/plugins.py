"""Loading plugins through the ``convnet`` entry-point group, the built-ins included."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterable
from typing import Any, TextIO

import pluggy

from convnet.core import hookspecs
from convnet.core.errors import ConvnetError, PluginError, RecipeError
from convnet.core.registry import FailedPlugin, Registries

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


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def create_manager(strict: bool = False) -> tuple[pluggy.PluginManager, Registries]:
    """Load every plugin of the group and fill fresh registries.

    A plugin that fails to import or to register is reported (with its entry point and
    distribution) and skipped; with ``strict`` it is an error instead.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registries = Registries()
    dists: dict[str, str] = {}
    values: dict[str, str] = {}
    for ep in _entry_points():
        dist = _dist_name(ep)
        try:
            module = ep.load()
            if pm.is_registered(module):
                continue
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take the rest down
            error = f"failed to import: {_last_line(exc)}"
            failed = FailedPlugin(
                ep.name, ep.value, dist, error, f"plugin {ep.name!r} ({ep.value}, distribution {dist}) {error}"
            )
            _problem(registries, strict, failed)
            continue
        dists[ep.name] = dist
        values[ep.name] = ep.value
    # convnet's own plugins first, then the others by name: a third party can never take a
    # built-in name (its registration is the one refused), whatever the order of sys.path.
    impls = sorted(
        pm.hook.convnet_register.get_hookimpls(),
        key=lambda i: (dists.get(i.plugin_name, "").split(" ")[0] != OWN_DISTRIBUTION, i.plugin_name),
    )
    for impl in impls:
        name = impl.plugin_name
        dist = dists.get(name, "<registered directly>")
        registries.current_plugin = (name, dist)
        registries.attempted = []
        try:
            impl.function(registries=registries)
        except Exception as exc:
            registries.discard_plugin(name)  # a plugin is loaded whole or not at all
            error = f"failed while registering: {_last_line(exc)}"
            message = str(exc) if isinstance(exc, ConvnetError) else f"plugin {name!r} (distribution {dist}) {error}"
            failed = FailedPlugin(
                name,
                values.get(name, name),
                dist,
                str(exc) if isinstance(exc, ConvnetError) else error,
                message,
                tuple(registries.attempted),
            )
            _problem(registries, strict, failed)
    registries.current_plugin = ("<none>", "<none>")
    registries.attempted = []
    return pm, registries


def _problem(registries: Registries, strict: bool, failed: FailedPlugin) -> None:
    if strict:
        raise PluginError(failed.message)
    registries.failed.append(failed)
    registries.problems.append(failed.message)
    warnings.warn(failed.message, PluginWarning, stacklevel=3)


def report_problems(registries: Registries, stream: TextIO | None = None) -> None:
    """One line per plugin that failed to load, on stderr: every command that loads plugins says so."""
    for failed in registries.failed:
        print(f"convnet: warning: {failed.message}", file=stream or sys.stderr)


_STATE: dict[str, tuple[pluggy.PluginManager, Registries]] = {}


def load_plugins(strict: bool = False) -> Registries:
    """The components of every installed plugin (loaded once per process; public as
    ``convnet.core.load_plugins``). Failed plugins are in ``.failed`` and ``.problems``."""
    return registries(strict)


def manager(strict: bool = False) -> pluggy.PluginManager:
    return _load(strict)[0]


def registries(strict: bool = False) -> Registries:
    return _load(strict)[1]


def _load(strict: bool) -> tuple[pluggy.PluginManager, Registries]:
    key = "strict" if strict else "lenient"
    if key not in _STATE:
        with warnings.catch_warnings():  # the caller reports problems (report_problems) once
            warnings.simplefilter("ignore", PluginWarning)
            _STATE[key] = create_manager(strict)
    return _STATE[key]


def reset() -> None:
    """Forget the loaded plugins (after installing one, or in tests)."""
    _STATE.clear()


def hooks_without(
    pm: pluggy.PluginManager, disabled: Iterable[str], registries: Registries, path: str = "plugins.disable"
) -> Any:
    """The lifecycle hooks of ``pm`` with the plugins named in ``disabled`` left out.

    Only a plugin that registers no component may be disabled (its components would vanish
    from under the recipe); an unknown name is a recipe error listing the plugins.
    """
    names = list(disabled)
    if not names:
        return pm.hook
    providers = set(registries.distributions())
    known = sorted(n for n, _ in pm.list_name_plugin() if n is not None)
    removed = []
    for i, name in enumerate(names):
        plugin = pm.get_plugin(name)
        if plugin is None:
            raise RecipeError(f"{path}[{i}]: no plugin named {name!r} is loaded (plugins: {', '.join(known)})")
        if name in providers:
            raise RecipeError(
                f"{path}[{i}]: plugin {name!r} registers components; only a plugin that only "
                "observes runs through hooks can be disabled"
            )
        removed.append(plugin)
    return _HookSubset(pm, removed)


class _HookSubset:
    """``pm.hook``-like: ``.convnet_step_end(...)`` calls every implementation but those removed."""

    def __init__(self, pm: pluggy.PluginManager, removed: list[object]) -> None:
        self._pm, self._removed = pm, removed

    def __getattr__(self, name: str) -> Any:
        caller = self._pm.subset_hook_caller(name, remove_plugins=self._removed)
        setattr(self, name, caller)
        return caller


def culprit(exc: BaseException) -> str | None:
    """``plugin 'name' (distribution d v) at FILE:LINE`` when ``exc`` was raised in a third-party
    plugin's own code (a hook, an evaluator, a dataset read in the main process), else None.

    The traceback is read from the innermost frame outward, past the libraries (torch, the
    standard library): the first frame that is a plugin's names it; one that is convnet's own
    means convnet's bug (None). A data-loader worker's error carries its frames as text only:
    the last ``File "..."`` line that is a plugin's or convnet's decides the same way.
    """
    import convnet.core
    import convnet.plugins

    ours = [os.path.dirname(convnet.core.__file__) + os.sep, os.path.dirname(convnet.plugins.__file__) + os.sep]
    roots: list[tuple[str, str]] = []
    for ep in _entry_points():
        dist = _dist_name(ep)
        if dist.split(" ")[0] == OWN_DISTRIBUTION:
            continue
        module = sys.modules.get(ep.value.split(":")[0].strip().split(".")[0])
        path = getattr(module, "__file__", None)
        if path:
            is_package = os.path.basename(path) == "__init__.py"
            roots.append(
                (os.path.dirname(path) + os.sep if is_package else path, f"plugin {ep.name!r} (distribution {dist})")
            )
    if not roots:
        return None

    def owner(filename: str) -> str | None:
        """``"convnet"``, a plugin's label, or None (a library)."""
        if any(filename.startswith(root) for root in ours):
            return "convnet"
        for root, who in roots:
            inside = filename == root if not root.endswith(os.sep) else filename.startswith(root)
            # a project folder used as the package may hold a virtualenv: its libraries are not the plugin
            if inside and not any(part in filename[len(root) :] for part in ("site-packages", "dist-packages")):
                return who
        return None

    frames = [(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(exc.__traceback__)]
    text = str(exc)
    if "Original Traceback" in text:  # a data-loader worker's: its frames come after the main process's
        frames += [(m.group(1), int(m.group(2))) for m in re.finditer(r'File "([^"]+)", line (\d+)', text)]
    for filename, line in reversed(frames):
        who = owner(filename)
        if who == "convnet":
            return None
        if who is not None:
            return f"{who} at {filename}:{line}"
    return None
