"""``convnet export RECIPE --checkpoint CKPT --format torch|onnx --out FILE``: a trained network
for serving, without convnet's training code.

- ``torch``: a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``). Custom
  operators stay custom operators (``convnet::lrn_forward``), so running it needs convnet's
  kernels loaded: ``from convnet.plugins.lrn import kernels; kernels.get("cpu")`` (importing
  ``convnet.plugins.lrn`` defines the operator; ``kernels.get`` builds or loads its CPU code).
- ``onnx``: the same program through ``torch.onnx.export`` (dynamo exporter, onnxscript). A
  plugin whose layers call a custom operator says how that operator becomes ONNX: its registry
  entry's factory carries ``onnx_translations``, a dict ``{OpOverload: onnxscript function}``
  (as ``convnet build-kernels`` finds a factory's ``build``); the core knows no operator.
  Needs the optional ``export`` extra (``pip install 'convnet[export]'``).

The network is exported for inference: eval mode, parameters not requiring grad, batch size
dynamic. After writing, the program is run on a random batch against the eager network and the
largest logit difference is reported (ONNX through onnxruntime when it is installed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from convnet.core import checkpoint as ckpt
from convnet.core import schema
from convnet.core.errors import ConvnetError, RecipeError
from convnet.core.model import build_model
from convnet.core.registry import Registries

FORMATS = ("torch", "onnx")
EXTRA_HINT = "install the export extra: pip install 'convnet[export]'"
CHECK_BATCH = 2


@attrs.define
class Exported:
    path: Path
    format: str
    max_difference: float | None  # None: not checked, for the reason in ``unchecked``
    unchecked: str = ""


def load_network(recipe: schema.Recipe, checkpoint: str | Path, registries: Registries) -> nn.Module:
    """The recipe's network with the checkpoint's weights, ready for inference tracing."""
    network = build_model(recipe, "cpu", registries)
    tensors, _ = ckpt.load(checkpoint)
    state = ckpt.model_tensors(tensors)
    ckpt.check_compatible(checkpoint, network.state_dict(), state)
    network.load_state_dict(state)
    return network.eval().requires_grad_(False)


def example_batch(recipe: schema.Recipe, network: nn.Module, batch: int = CHECK_BATCH, seed: int = 0) -> torch.Tensor:
    dtype = next(iter(network.parameters())).dtype
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *recipe.model.input), generator=gen, dtype=dtype)


def export_program(network: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Traced with parameters not requiring grad, so ops take their inference form (no saved state)."""
    return torch.export.export(network, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def onnx_translations(registries: Registries) -> dict[Any, Callable[..., Any]]:
    """Every ``{op: onnxscript function}`` that registered components carry; an op claimed twice is an error."""
    table: dict[Any, Callable[..., Any]] = {}
    owners: dict[Any, str] = {}
    for _kind, registry in registries.items():
        for entry in registry:
            for op, fn in (getattr(entry.factory, "onnx_translations", None) or {}).items():
                if op in table and table[op] is not fn:
                    raise ConvnetError(
                        f"the ONNX translation of {op} is registered by plugin {owners[op]!r} "
                        f"and by plugin {entry.plugin!r}"
                    )
                table[op], owners[op] = fn, entry.plugin
    return table


def save_torch(program: torch.export.ExportedProgram, out: Path) -> None:
    try:
        torch.export.save(program, out)
    except (OSError, RuntimeError) as exc:  # torch's writer reports a failed open as RuntimeError
        raise ConvnetError(f"{out}: cannot write the program ({_first_line(exc)})") from None


def save_onnx(
    program: torch.export.ExportedProgram, example: torch.Tensor, out: Path, translations: dict[Any, Callable[..., Any]]
) -> None:
    _require("onnx", "onnxscript")
    weights = sum(p.numel() * p.element_size() for p in program.state_dict.values())
    try:
        torch.onnx.export(
            program,
            (example,),
            str(out),
            dynamo=True,
            custom_translation_table=translations,
            external_data=weights > 1_800_000_000,
            verbose=False,
        )
    except Exception as exc:
        raise ConvnetError(f"{out}: ONNX export failed: {_first_line(exc)}") from None


def check_torch(program: torch.export.ExportedProgram, network: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((program.module()(x) - network(x)).abs().max())


def check_onnx(out: Path, network: nn.Module, x: torch.Tensor) -> float | str:
    """The largest logit difference from eager under onnxruntime, or why it was not checked."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    try:
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    except Exception as exc:  # onnxruntime's CPU provider lacks some kernels (float64 Conv)
        return f"onnxruntime cannot run it: {_first_line(exc)}"
    with torch.no_grad():
        return float((torch.from_numpy(logits) - network(x)).abs().max())


def export(
    recipe: schema.Recipe, checkpoint: str | Path, out: str | Path, fmt: str, registries: Registries
) -> Exported:
    if fmt not in FORMATS:
        raise ConvnetError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "torch" and out.suffix != ".pt2":
        raise RecipeError(f"--out {out}: a torch.export program is a .pt2 file (torch.export.load expects the suffix)")
    if fmt == "onnx":  # before the slow part: a missing extra fails at once
        _require("onnx", "onnxscript")
    try:  # and a place the file cannot go
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvnetError(f"{out}: cannot write there ({exc.strerror or exc}: {exc.filename})") from None
    if out.is_dir():
        raise ConvnetError(f"{out}: is a folder; give --out a file name")
    network = load_network(recipe, checkpoint, registries)
    x = example_batch(recipe, network)
    program = export_program(network, x)
    if fmt == "torch":
        save_torch(program, out)
        return Exported(out, fmt, check_torch(program, network, x))
    save_onnx(program, x, out, onnx_translations(registries))
    checked = check_onnx(out, network, x)
    if isinstance(checked, str):
        return Exported(out, fmt, None, checked)
    return Exported(out, fmt, checked)


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConvnetError(f"ONNX export needs {', '.join(missing)}: {EXTRA_HINT}")


def _first_line(exc: BaseException) -> str:
    """The innermost cause's message: the exporter nests the useful one."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
