"""``train.compile``: the engine's module compiled with ``torch.compile``, in place.

``nn.Module.compile()`` keeps the module object (no ``_orig_mod.`` wrapper), so parameter
names, ``state_dict`` keys and therefore checkpoints are the same files compiled or eager, and a
checkpoint of one resumes in the other. Inductor is told to draw random numbers (dropout) with
the eager ops (``fallback_random``): a compiled run sees the same dropout masks as an eager one
from the same seed, so the two agree within float32 rounding, not just in distribution.
"""

from __future__ import annotations

from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(mode: str) -> dict[str, object]:
    """Inductor options of ``mode`` plus eager random numbers (torch.compile takes a mode or options)."""
    from torch import _inductor

    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {', '.join(MODES)}")
    return {**_inductor.list_mode_options(mode), "fallback_random": True}


def compile_in_place(module: nn.Module, mode: str = "default") -> None:
    """Compile ``module``'s forward on its first call (and again per new input shape or train/eval)."""
    module.compile(options=compile_options(mode))
