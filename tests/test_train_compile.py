"""``train.compile``: the compiled run follows the eager one within float32 rounding, writes the
same checkpoint files (same tensor names and shapes), and each resumes the other's checkpoint.

Compiling alexnet-digits takes one to three minutes on the project's 2-core CPU, so the run
tests are marked slow and kept to three steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

import convnet.core as cn
from convnet.core.errors import RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 3


def _train(out: Path, compile_: bool, steps: int, resume: Path | None = None) -> list[float]:
    recipe = cn.load_recipe(
        "alexnet-digits", [f"train.max_steps={steps}", "train.log_every=1", f"train.compile={str(compile_).lower()}"]
    )
    cn.train(recipe, out=out, resume=resume)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _layout(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_checkpoints_cross_resume(tmp_path):
    eager = _train(tmp_path / "eager", False, STEPS)
    assert len(eager) == STEPS

    compiled = _train(tmp_path / "compiled", True, STEPS - 1)
    assert compiled == pytest.approx(eager[: STEPS - 1], rel=1e-5)
    compiled_ckpt = tmp_path / "compiled" / "checkpoints" / "last.safetensors"
    _train(tmp_path / "eager-short", False, STEPS - 1)
    eager_ckpt = tmp_path / "eager-short" / "checkpoints" / "last.safetensors"
    assert _layout(compiled_ckpt) == _layout(eager_ckpt), "compiling must not rename or reshape a tensor"

    # a compiled run's checkpoint resumes eagerly, and an eager one resumes compiled
    resumed_eagerly = _train(tmp_path / "compiled", False, STEPS, resume=compiled_ckpt)
    resumed_compiled = _train(tmp_path / "eager-short", True, STEPS, resume=eager_ckpt)
    assert resumed_eagerly[-1] == pytest.approx(eager[-1], rel=1e-5)
    assert resumed_compiled[-1] == pytest.approx(eager[-1], rel=1e-5)


def test_compile_mode_is_validated_with_its_recipe_path():
    with pytest.raises(RecipeError, match="train.compile_mode"):
        cn.load_recipe("alexnet-digits", ["train.compile_mode=fastest"])


def test_compile_is_off_by_default():
    recipe = cn.load_recipe("alexnet-digits")
    assert recipe.train.compile is False and recipe.train.compile_mode == "default"
