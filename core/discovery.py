"""What `convnet plugins` shows: each plugin's components, hooks and commands, and a
component's options with their types and defaults."""

from __future__ import annotations

import argparse
from typing import Any

import attrs
import pluggy

from convnet.core.errors import RecipeError
from convnet.core.registry import KINDS, Registries


def plugin_table(pm: pluggy.PluginManager, registries: Registries) -> list[dict[str, Any]]:
    """Per loaded plugin: its distribution, the hooks it implements and the commands it adds."""
    import importlib.metadata as md

    dists = {
        ep.name: f"{ep.dist.name} {ep.dist.version}" if ep.dist else "<unknown distribution>"
        for ep in md.entry_points(group="convnet")
    }
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: str(item[0])):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [] if h.name != "convnet_register")
        rows.append(
            {
                "name": name,
                "distribution": dists.get(name, "<registered directly>"),
                "components": sum(e.plugin == name for _, reg in registries.items() for e in reg),
                "hooks": [h for h in hooks if h != "convnet_add_commands"],
                "commands": _commands_of(pm, name),
            }
        )
    return rows


def _commands_of(pm: pluggy.PluginManager, plugin_name: str) -> list[str]:
    """The subcommands one plugin adds (asked on a throwaway parser)."""
    for impl in pm.hook.convnet_add_commands.get_hookimpls():
        if impl.plugin_name != plugin_name:
            continue
        sub = argparse.ArgumentParser(add_help=False).add_subparsers()
        try:
            impl.function(subparsers=sub)
        except Exception:
            return []
        return sorted(sub.choices)
    return []


def describe_component(registries: Registries, kind: str, name: str) -> dict[str, Any]:
    """A component's entry and its options: name, type, default (``""`` when required)."""
    if kind not in KINDS:
        raise RecipeError(f"plugins: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    entry = registries[kind].get(name, f"plugins {kind}")
    options = []
    for field in attrs.fields(entry.options):
        default: Any = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory() if not default.takes_self else "(computed)"
        elif default is attrs.NOTHING:
            default = ""
        options.append(
            {"name": field.alias or field.name, "type": _type_name(field.type), "default": default, "doc": ""}
        )
    return {
        "kind": kind,
        "name": name,
        "description": entry.description,
        "plugin": entry.plugin,
        "distribution": entry.distribution,
        "options": options,
    }


def _type_name(type_: Any) -> str:
    if type_ is None:
        return "any"
    if isinstance(type_, str):
        return type_
    return getattr(type_, "__name__", None) or str(type_).replace("typing.", "")
