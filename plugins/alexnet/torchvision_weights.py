"""Load torchvision's ``alexnet`` weights into the ``alexnet-torchvision`` recipe's network.

torchvision names its parameters by position in two ``nn.Sequential`` blocks
(``features.N``, ``classifier.N``); the recipe names them by layer id. The map below is
the whole conversion: the tensors themselves need no reshaping (one tower, so the fc
weights are plain ``[out, in]`` and the flatten order is torchvision's).

Files are read without unpickling code: ``.safetensors`` directly, ``.pth``/``.pt`` with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from convnet.core import ConvnetError, Network, build_model, load_plugins, load_recipe, save_checkpoint, to_toml
from convnet.plugins.alexnet import RECIPE

TORCHVISION_TO_LAYER = {
    "features.0": "conv1",
    "features.3": "conv2",
    "features.6": "conv3",
    "features.8": "conv4",
    "features.10": "conv5",
    "classifier.1": "fc6",
    "classifier.4": "fc7",
    "classifier.6": "fc8",
}


class ConversionError(ConvnetError):
    """A weight file that is not torchvision's alexnet state_dict: names the file and the key."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a weights-only ``.pth``; a ``module.`` prefix is dropped."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such weight file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConversionError(f"{path}: not a valid safetensors file: {exc}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refusals and corrupt archives raise assorted types
            raise ConversionError(
                f"{path}: cannot read as a weights-only torch file "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: expected a state_dict (names -> tensors), found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_state_dict(state: dict[str, torch.Tensor], source: str = "state_dict") -> dict[str, torch.Tensor]:
    """torchvision names -> the recipe network's names (``layers.<id>.weight``/``.bias``)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".")
        layer = TORCHVISION_TO_LAYER.get(module)
        if layer is None or kind not in ("weight", "bias"):
            raise ConversionError(
                f"{source}: unexpected tensor {key!r}; torchvision's alexnet has "
                f"{', '.join(f'{m}.weight/bias' for m in TORCHVISION_TO_LAYER)}"
            )
        out[f"layers.{layer}.{kind}"] = tensor
    return out


def check_against(model: Network, converted: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor present with the model's shape, nothing extra."""
    expected = model.state_dict()
    back = {f"layers.{v}": k for k, v in TORCHVISION_TO_LAYER.items()}
    for name, tensor in expected.items():
        prefix, _, kind = name.rpartition(".")
        theirs = f"{back.get(prefix, prefix)}.{kind}"
        if name not in converted:
            raise ConversionError(f"{source}: missing {theirs!r} (needed for {name})")
        if tuple(converted[name].shape) != tuple(tensor.shape):
            raise ConversionError(
                f"{source}: {theirs!r} has shape {list(converted[name].shape)}, "
                f"the recipe's {name} needs {list(tensor.shape)}"
            )
    extra = sorted(set(converted) - set(expected))
    if extra:
        raise ConversionError(f"{source}: {extra[0]!r} has no layer in the recipe's network")


def load_torchvision_alexnet(model: Network, state: dict[str, torch.Tensor], source: str = "state_dict") -> Network:
    """Copy torchvision alexnet weights into ``model`` (built from ``alexnet-torchvision``)."""
    converted = convert_state_dict(state, source)
    check_against(model, converted, source)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in converted.items()})
    return model


def convert_file(
    src: str | Path, out: str | Path, recipe_ref: str = RECIPE, registries=None, overrides: Sequence[str] = ()
) -> Path:
    """Write ``src`` (torchvision weights) as a convnet weights file for ``recipe_ref``.

    The result is a safetensors file in the checkpoint format (``model/<name>`` tensors and
    the resolved recipe in its metadata) without training state: it can be evaluated or
    fine-tuned from, not resumed.
    """
    regs = registries if registries is not None else load_plugins()
    recipe = load_recipe(recipe_ref, overrides, regs)
    model = build_model(recipe, device="meta", registries=regs)
    converted = convert_state_dict(read_state_dict(src), str(src))
    check_against(model, converted, str(src))
    out = Path(out)
    save_checkpoint(
        out,
        {f"model/{k}": v for k, v in converted.items()},
        {"convnet.recipe": to_toml(recipe, regs), "convnet.converted_from": str(src)},
    )
    return out
