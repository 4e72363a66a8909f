"""Third-party code that draws from the global generators (python's ``random``, numpy's
``np.random``) is reproducible: the engine seeds them from the recipe's seed at the start of a
run and per sample in data loading. The augmenter under test is a real installed plugin
(tests/fixtures/plugins/global-rng-augmenter) that ignores the generator it is handed."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

import convnet.core as cn
from convnet.core import plugins
from convnet.core.engine import Run

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
NOISE = 'data.train_augment=[{name = "fixture_global_noise", std = 0.5}]'

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def managed(tmp_path_factory):
    """(plugin manager, registries) that see the installed fixture augmenter."""
    from fixtures.plugin_install import install

    site = install(["global-rng-augmenter"], tmp_path_factory.mktemp("site"))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        pm, regs = plugins.create_manager()
        assert "fixture_global_noise" in regs.augmenter, regs.problems
        yield pm, regs


def _run(managed, out: Path, *overrides: str, resume: Path | None = None) -> dict[str, bytes]:
    pm, regs = managed
    recipe = cn.load_recipe(TINY, [NOISE, *overrides], regs)
    Run(recipe, out=out, resume=resume, registries=regs, pm=pm, quiet=True).train()
    return {k: v.numpy().tobytes() for k, v in load_file(out / "checkpoints" / "last.safetensors").items()}


def _model(tensors: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in tensors.items() if k.startswith("model/")}


def test_an_augmenter_drawing_from_global_generators_is_the_same_with_0_and_2_workers(managed, tmp_path) -> None:
    zero = _run(managed, tmp_path / "w0", "data.workers=0", "train.max_steps=5")
    two = _run(managed, tmp_path / "w2", "data.workers=2", "train.max_steps=5")
    again = _run(managed, tmp_path / "w0-again", "data.workers=0", "train.max_steps=5")
    assert _model(zero) == _model(two) == _model(again)
    # the noise is really there: without it the weights differ
    quiet = _run(
        managed,
        tmp_path / "w0-quiet",
        "data.workers=0",
        "train.max_steps=5",
        'data.train_augment=[{name = "fixture_global_noise", std = 0.0}]',
    )
    assert _model(quiet) != _model(zero)


def test_its_batched_form_on_the_device_is_the_same_with_0_and_2_workers(managed, tmp_path) -> None:
    """augment_on = "device" runs the chain in the training process, where workers do not reseed
    the global generators: the batch seeds them."""
    device = ['data.augment_on="device"', "train.max_steps=5"]
    zero = _run(managed, tmp_path / "w0", "data.workers=0", *device)
    two = _run(managed, tmp_path / "w2", "data.workers=2", *device)
    assert _model(zero) == _model(two)
    quiet = _run(managed, tmp_path / "q", "data.workers=0", *device, NOISE.replace("0.5", "0.0"))
    assert _model(quiet) != _model(zero)


@pytest.mark.parametrize("workers", [0, 2])
def test_six_straight_equals_three_resume_three_in_every_tensor(managed, tmp_path, workers: int) -> None:
    """Model, optimizer and every generator's state (torch, numpy, python) bit for bit."""
    straight = _run(managed, tmp_path / "a", f"data.workers={workers}", "train.max_steps=6")
    _run(managed, tmp_path / "b", f"data.workers={workers}", "train.max_steps=3")
    resumed = _run(
        managed,
        tmp_path / "b",
        f"data.workers={workers}",
        "train.max_steps=6",
        resume=tmp_path / "b" / "checkpoints" / "last.safetensors",
    )
    assert {"rng/torch", "rng/numpy", "rng/python"} <= straight.keys()
    assert straight.keys() == resumed.keys()
    assert [k for k in straight if straight[k] != resumed[k]] == []
