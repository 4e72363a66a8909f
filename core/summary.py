"""``convnet summary``: per layer shapes, parameters, multiply-adds, towers and exchanges."""

from __future__ import annotations

from typing import Any

from convnet.core import schema
from convnet.core.components import build_strategy
from convnet.core.model import build_model, describe
from convnet.core.registry import Registries


def summarize(recipe: schema.Recipe, registries: Registries) -> dict[str, Any]:
    model = build_model(recipe, device="meta", registries=registries)
    rows = describe(model)
    strategy = build_strategy(recipe, registries)
    return {
        "recipe": recipe.name,
        "input": list(recipe.model.input),
        "towers": recipe.model.towers,
        "strategy": recipe.parallel.name,
        "layers": rows,
        "params": sum(r["params"] for r in rows),
        "macs": sum(r["macs"] for r in rows),
        "exchange_layers": [r["id"] for r in rows if r["exchanges"]],
        "devices": strategy.describe(model),
    }


def format_summary(info: dict[str, Any]) -> str:
    head = f"{'layer':<12}{'kind':<10}{'towers':<11}{'output':<16}{'params':>14}{'mult-adds':>16}{'per tower':>14}"
    lines = [
        f"{info['recipe']}: input {info['input']}, {info['towers']} tower(s), strategy {info['strategy']}",
        head,
        "-" * len(head),
    ]
    for r in info["layers"]:
        shape = "x".join(map(str, r["out_shape"]))
        tower = r["towers"] + (" <->" if r["exchanges"] else "")
        lines.append(
            f"{r['id']:<12}{r['layer']:<10}{tower:<11}{shape:<16}{r['params']:>14,}{r['macs']:>16,}"
            f"{r['macs_per_tower']:>14,}"
        )
    lines.append("-" * len(head))
    lines.append(f"{'total':<49}{info['params']:>14,}{info['macs']:>16,}")
    if info["exchange_layers"]:
        lines.append(f"layers reading across towers (<->): {', '.join(info['exchange_layers'])}")
    for d in info["devices"]:
        lines.append(
            f"device {d['device']}: {d['params']:,} parameters, "
            f"{d['activation_bytes_per_sample']:,} activation bytes per sample, "
            f"{d['exchanged_bytes_per_sample']:,} bytes exchanged per sample"
            + (
                f", {d['exchanged_bytes_per_step']:,} bytes exchanged per step"
                if "exchanged_bytes_per_step" in d
                else ""
            )
        )
    return "\n".join(lines)
