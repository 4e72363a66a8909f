"""A run's checkpoints: what goes into ``checkpoints/{last,best}.safetensors`` and back out.

Tensors: ``model/<canonical name>``, ``optimizer/<param name>/<buffer>``, ``rng/...`` and
``plugin/<plugin>/<key>``. Metadata: the resolved recipe, ``convnet.state`` (JSON: the
``TrainState`` fields, optimizer hyper-parameters and per-parameter numbers, schedule state,
python/numpy RNG scalars),
``convnet.components`` (which distribution supplied each component) and
``convnet.plugin_state`` (the JSON part of plugins' state).
"""

from __future__ import annotations

import json
import tomllib
import warnings
from pathlib import Path
from typing import Any

import torch

from convnet.core import checkpoint as ckpt
from convnet.core.components import Components
from convnet.core.errors import CheckpointError, PluginError
from convnet.core.recipe import resume_difference
from convnet.core.registry import Registries
from convnet.core.schema import Recipe
from convnet.core.strategy import Strategy
from convnet.core.train_state import TrainState

PLUGIN_PREFIX = "plugin/"


class RunCheckpoints:
    """Writes and restores the checkpoints of one run folder."""

    def __init__(self, folder: Path, strategy: Strategy, recipe_toml: str, components: list[dict[str, str]]) -> None:
        self.folder, self.strategy = folder, strategy
        self.recipe_toml = recipe_toml
        self.components_json = json.dumps(components)

    def path(self, which: str = "last") -> Path:
        return self.folder / "checkpoints" / f"{which}.safetensors"

    def save(self, which: str, parts: Components, state: TrainState, plugin_state: dict[str, dict[str, Any]]) -> Path:
        """Write ``which`` atomically (every process takes part: sharded state is gathered)."""
        opt_tensors, opt_numbers, groups = _optimizer_state(parts)
        model_state = self.strategy.state_dict(parts.module)
        opt_tensors = self.strategy.gather_tensors(opt_tensors)
        path = self.path(which)
        if not self.strategy.is_main:
            return path
        rng, rng_meta = ckpt.capture_rng()
        tensors = {f"model/{k}": v for k, v in model_state.items()}
        tensors.update({f"optimizer/{k}": v for k, v in opt_tensors.items()})
        tensors.update(rng)
        plugin_json = {plugin: _plugin_values(plugin, values, tensors) for plugin, values in plugin_state.items()}
        plugin_json = {plugin: values for plugin, values in plugin_json.items() if values}
        saved = {
            **state.to_json(),
            "optimizer_groups": groups,
            "optimizer_numbers": opt_numbers,
            "schedule": parts.schedule.state_dict(),
            "rng": rng_meta,
        }
        ckpt.save(
            path,
            tensors,
            {
                "convnet.recipe": self.recipe_toml,
                "convnet.state": json.dumps(saved),
                "convnet.components": self.components_json,
                "convnet.plugin_state": json.dumps(plugin_json),
            },
        )
        return path

    def copy(self, src: str, dst: str) -> None:
        if self.strategy.is_main:
            ckpt.copy(self.path(src), self.path(dst))

    def restore(
        self, path: Path, parts: Components, recipe: Recipe, registries: Registries
    ) -> tuple[TrainState, dict[str, dict[str, Any]]]:
        """Load ``path`` into ``parts``; return the position and each plugin's saved state."""
        tensors, metadata = ckpt.load(path)
        saved = ckpt.state_of(metadata, path)
        model_state = ckpt.model_tensors(tensors)
        ckpt.check_compatible(path, parts.network.state_dict(), model_state)
        check_same_run(path, metadata.get("convnet.recipe", ""), recipe, registries)
        groups_now, groups_saved = len(parts.optimizer.param_groups), len(saved["optimizer_groups"])
        if groups_now != groups_saved:  # settings matched by position would go to the wrong parameters
            raise CheckpointError(
                f"{path}: saved by an optimizer with {groups_saved} parameter group(s); this run's has "
                f"{groups_now}, so its settings (lr, weight decay) cannot be put back group by group"
            )
        self.strategy.load_state_dict(parts.module, model_state)
        opt = {k[len("optimizer/") :]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        opt = self.strategy.scatter_tensors(opt)
        for key, value in opt.items():
            name, _, buf = key.rpartition("/")
            p = parts.parameters.get(name)
            if p is None:
                continue
            if value.shape == p.shape:  # per element (a velocity): in the parameter's memory layout, as
                # the optimizer made it (channels_last), so that a fused step still takes it
                parts.optimizer.state[p][buf] = torch.empty_like(p, dtype=value.dtype).copy_(value)
            else:
                parts.optimizer.state[p][buf] = value.to(device=p.device)
        for key, number in saved.get("optimizer_numbers", {}).items():
            name, _, buf = key.rpartition("/")
            p = parts.parameters.get(name)
            if p is not None:
                parts.optimizer.state[p][buf] = number
        for group, saved_group in zip(parts.optimizer.param_groups, saved["optimizer_groups"], strict=True):
            for k, v in saved_group.items():
                if k != "params":
                    group[k] = v
        parts.schedule.load_state_dict(saved["schedule"])
        try:
            ckpt.restore_rng(tensors, saved["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: RNG state is missing or corrupt ({exc})") from None
        return TrainState.from_json(saved), _plugin_state(tensors, metadata, path)


def check_same_run(path: Path, saved_text: str, recipe: Recipe, registries: Registries) -> None:
    """Refuse a checkpoint whose recipe trains differently: the run would not continue."""
    try:
        diff = resume_difference(saved_text, recipe, registries)
    except tomllib.TOMLDecodeError:
        raise CheckpointError(f"{path}: the recipe stored in the checkpoint is not valid TOML") from None
    if diff is not None:
        key, old, new = diff
        raise CheckpointError(
            f"{path}: saved by a run whose recipe differs at {key} (checkpoint: {old!r}, now: {new!r}); "
            "resuming would not continue that run. Use the same recipe and --set values "
            "(epochs, max_steps, strategy, workers and evaluators may change)"
        )


def _optimizer_state(
    parts: Components,
) -> tuple[dict[str, torch.Tensor], dict[str, bool | int | float], list[dict[str, Any]]]:
    """The optimizer's per-parameter state by ``<param name>/<key>``: tensors (gathered from every
    process) and plain numbers (a step counter; this process's, in the metadata's JSON: equal on
    every shard of a parameter for an elementwise optimizer); and its groups with params by name.

    Other values cannot be saved: a warning names them, since a resume would start them afresh.
    """
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, bool | int | float] = {}
    unsaved: list[str] = []
    for name, p in parts.parameters.items():
        for key, value in parts.optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value
            elif isinstance(value, (bool, int, float)):
                numbers[f"{name}/{key}"] = value
            else:
                unsaved.append(f"{name}/{key} ({type(value).__name__})")
    if unsaved:
        warnings.warn(
            f"{type(parts.optimizer).__name__} keeps per-parameter state that is neither a tensor nor a "
            f"number, which checkpoints cannot hold and a resume starts afresh: {', '.join(unsaved[:3])}"
            + (f" and {len(unsaved) - 3} more" if len(unsaved) > 3 else ""),
            stacklevel=2,
        )
    names = {id(p): n for n, p in parts.parameters.items()}
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
        for g in parts.optimizer.param_groups
    ]
    return tensors, numbers, groups


TENSOR_REF = "$tensor"  # in a plugin's JSON state: {"$tensor": name} stands for the tensor plugin/<plugin>/<name>


def _plugin_values(plugin: str, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A plugin's state split into tensors (added to ``tensors`` as ``plugin/<plugin>/<path>``,
    copied: they may be the live weights, whose memory safetensors will not store twice) and
    the JSON rest, where a tensor inside a dict or list is a ``{"$tensor": path}`` reference."""

    def split(value: Any, path: list[str]) -> Any:
        if isinstance(value, torch.Tensor):
            name = "/".join(path)
            key = f"{PLUGIN_PREFIX}{plugin}/{name}"
            if key in tensors:
                raise PluginError(f"plugin {plugin!r}: convnet_save_state gives two tensors the name {name!r}")
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
            return {TENSOR_REF: name}
        if isinstance(value, dict):
            return {str(k): split(v, [*path, str(k)]) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [split(v, [*path, str(i)]) for i, v in enumerate(value)]
        return value

    rest: dict[str, Any] = {}
    for key, value in dict(values).items():
        kept = split(value, [str(key)])
        if not isinstance(value, torch.Tensor):  # a top-level tensor needs no reference
            rest[str(key)] = kept
        try:
            json.dumps(kept, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise PluginError(
                f"plugin {plugin!r}: convnet_save_state's {key!r} cannot be saved ({exc}); "
                "return tensors and JSON values (numbers, strings, lists and dicts of them)"
            ) from None
    return rest


def _plugin_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    try:
        state: dict[str, dict[str, Any]] = json.loads(metadata.get("convnet.plugin_state", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata 'convnet.plugin_state' is corrupt") from None
    referenced: set[str] = set()

    def join(value: Any, plugin: str) -> Any:
        if isinstance(value, dict):
            if set(value) == {TENSOR_REF}:
                key = f"{PLUGIN_PREFIX}{plugin}/{value[TENSOR_REF]}"
                if key not in tensors:
                    raise CheckpointError(f"{path}: plugin {plugin!r}'s state names a tensor {key!r} it does not hold")
                referenced.add(key)
                return tensors[key]
            return {k: join(v, plugin) for k, v in value.items()}
        if isinstance(value, list):
            return [join(v, plugin) for v in value]
        return value

    state = {plugin: join(values, plugin) for plugin, values in state.items()}
    for key, value in tensors.items():
        if key.startswith(PLUGIN_PREFIX) and key not in referenced:
            plugin, _, name = key[len(PLUGIN_PREFIX) :].partition("/")
            state.setdefault(plugin, {})[name] = value
    return state
