"""model-parallel (one process, towers on ["cpu", ...]) against single: outputs, loss and
gradients in float64, checkpoints in one format across strategies, and the summary."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import convnet.core as cn
from convnet.core import keyed
from convnet.core.cli import main
from convnet.core.engine import Run, build_strategy
from convnet.core.errors import ConvnetError, RecipeError
from convnet.core.recipe import structure
from convnet.core.schema import Recipe
from convnet.core.summary import summarize


def _recipe(
    registries,
    layers: list[dict],
    towers: int,
    size: int,
    classes: int,
    strategy: dict,
    dtype: str = "float64",
    optimizer: dict | None = None,
    **data,
) -> Recipe:
    raw = {
        "seed": 1,
        "model": {"input": [3, size, size], "num_classes": classes, "towers": towers, "dtype": dtype, "layers": layers},
        "data": {
            "batch_size": 8,
            "workers": 0,
            "dataset": {"name": "synthetic", "train_size": 32, "val_size": 8},
            **data,
        },
        "train": {"epochs": 2, "log_every": 1, "optimizer": optimizer or {"name": "paper-sgd", "lr": 0.05}},
        "parallel": strategy,
    }
    return structure(raw, registries, "test")


@st.composite
def tower_networks(draw, swish: bool):
    """Random small tower networks: convs, LRN, pools, activations, fcs, local and cross."""
    towers = draw(st.sampled_from([1, 2, 4]))
    size = draw(st.integers(5, 9))
    acts = ["relu", "tanh"] + (["swish"] if swish else [])

    def towers_of(cross_p: bool) -> str:
        return "cross" if cross_p else "local"

    def width() -> int:
        return towers * draw(st.integers(1, 3))

    layers: list[dict] = [
        {
            "name": "conv",
            "towers": "cross",
            "out": width(),
            "kernel": draw(st.integers(1, 3)),
            "padding": 1,
            "weight_init": "kaiming",
            "bias": 0.1,
        }
    ]
    h = size + 2 - layers[0]["kernel"] + 1
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["conv", "act", "lrn", "pool"]))
        if kind == "conv":
            k = draw(st.integers(1, min(3, h + 2)))
            layers.append(
                {
                    "name": "conv",
                    "towers": towers_of(draw(st.booleans())),
                    "out": width(),
                    "kernel": k,
                    "padding": 1,
                    "weight_init": "kaiming",
                    "bias": draw(st.sampled_from([0.0, 0.1])),
                }
            )
            h = h + 2 - k + 1
        elif kind == "act":
            layers.append({"name": draw(st.sampled_from([*acts, "dropout"])), "towers": towers_of(draw(st.booleans()))})
        elif kind == "lrn":
            layers.append(
                {
                    "name": "lrn",
                    "impl": "reference",
                    "size": draw(st.integers(1, 5)),
                    "alpha": 0.5,
                    "towers": towers_of(draw(st.booleans())),
                }
            )
        elif h >= 3:
            layers.append({"name": draw(st.sampled_from(["maxpool", "avgpool"])), "kernel": 3, "stride": 2})
            h = (h - 3) // 2 + 1
    layers.append({"name": "flatten"})
    for _ in range(draw(st.integers(0, 2))):
        layers.append(
            {
                "name": "fc",
                "towers": towers_of(draw(st.booleans())),
                "out": width(),
                "weight_init": "kaiming",
                "bias": 0.1,
            }
        )
        layers.append({"name": draw(st.sampled_from([*acts, "dropout"])), "towers": towers_of(draw(st.booleans()))})
    classes = draw(st.integers(1, 7))  # often not a multiple of the towers: the last layer runs whole
    layers.append({"name": "fc", "towers": "cross", "out": classes, "weight_init": "kaiming"})
    if draw(st.booleans()):
        layers.append({"name": draw(st.sampled_from(acts))})
    return towers, size, classes, layers


LAYOUTS = {
    # every tower its own modules, as on distinct devices
    "per-tower": lambda t: {"devices": ["cpu"] * t, "fuse_shared_devices": False},
    # towers sharing a device run as one grouped layer
    "fused": lambda t: {"devices": ["cpu"] * t},
    # "cpu" and "cpu:0" are distinct devices (same memory): groups [0, 2] and [1, 3] for 4 towers
    "mixed": lambda t: {"devices": ["cpu", "cpu:0"] * (t // 2) + ["cpu"] * (t % 2)},
}


def _single_and_parallel(registries, towers, size, classes, layers, layout: str = "per-tower"):
    single = _recipe(registries, layers, towers, size, classes, {"strategy": "single", "device": "cpu"})
    mp = _recipe(registries, layers, towers, size, classes, {"strategy": "model-parallel", **LAYOUTS[layout](towers)})
    net = cn.build_model(single, "cpu", registries)
    reference = copy.deepcopy(net)
    strategy = build_strategy(mp, registries)
    return reference, strategy, strategy.prepare(net)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() / scale


@given(
    net=tower_networks(swish=False),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from(sorted(LAYOUTS)),
)
@settings(max_examples=30)
def test_model_parallel_equals_single_outputs_loss_gradients(registries, net, batch, seed, layout) -> None:
    _check_equal(registries, net, batch, seed, layout)


@given(net=tower_networks(swish=True), batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=8)
def test_model_parallel_splits_a_third_party_elementwise_layer(registries, net, batch, seed) -> None:
    if "swish" not in registries.layer:
        try:  # installed but not registered is a failure, not a skip
            importlib.metadata.distribution("convnet-swish")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("the example third-party plugin convnet-swish is not installed (tox installs it)")
        pytest.fail(f"convnet-swish is installed but registered no 'swish' layer: {registries.problems}")
    _check_equal(registries, net, batch, seed, "per-tower")


def _check_equal(registries, net, batch, seed, layout) -> None:
    towers, size, classes, layers = net
    reference, strategy, module = _single_and_parallel(registries, towers, size, classes, layers, layout)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (batch,), generator=g)

    # Training mode, dropout on: every tower piece draws its slice of single's keyed mask.
    with keyed.keyed_draws(seed, 1 + seed % 5, torch.randperm(1000, generator=g)[:batch]):
        out_ref, out_mp = reference(x), module(x)
    assert out_mp.shape == out_ref.shape == (batch, classes)
    assert _rel(out_ref, out_mp) <= 1e-12
    loss_ref = nn.functional.cross_entropy(out_ref, y)
    loss_mp = nn.functional.cross_entropy(out_mp, y)
    assert abs(loss_ref.item() - loss_mp.item()) <= 1e-12 * abs(loss_ref.item())
    loss_ref.backward()
    loss_mp.backward()

    grads = strategy.gather_tensors({f"{n}/grad": p.grad for n, p in strategy.named_parameters(module)})
    expected = {f"{n}/grad": p.grad for n, p in reference.named_parameters()}
    assert sorted(grads) == sorted(expected)
    for name, g_ref in expected.items():
        assert _rel(g_ref, grads[name]) <= 1e-12, name
    state = strategy.state_dict(module)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())


def test_parameters_live_on_their_towers_with_no_duplicates(registries) -> None:
    layers = [
        {"name": "conv", "towers": "cross", "out": 4, "kernel": 3},
        {"name": "conv", "out": 4, "kernel": 1},
        {"name": "flatten"},
        {"name": "fc", "towers": "cross", "out": 3},
    ]
    reference, strategy, module = _single_and_parallel(registries, 2, 5, 3, layers)
    named = list(strategy.named_parameters(module))
    assert len({id(p) for _, p in named}) == len(named) == len(list(module.parameters()))
    # conv weights split by rows; the 3-class fc does not split in 2 and stays whole on tower 0
    shapes = {n: tuple(p.shape) for n, p in named}
    assert shapes["towers0/layers.conv1.weight"] == shapes["towers1/layers.conv1.weight"] == (2, 3, 3, 3)
    assert shapes["towers1/layers.conv2.weight"] == (2, 2, 1, 1)
    assert shapes["layers.fc1.weight"] == (3, 4 * 3 * 3)
    assert sum(p.numel() for _, p in named) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("layout", ["per-tower", "fused"])
def test_features_after_a_layer_equal_single(registries, layout: str) -> None:
    layers = [
        {"name": "conv", "id": "conv1", "towers": "cross", "out": 4, "kernel": 3},
        {"name": "relu", "id": "relu1"},
        {"name": "flatten", "id": "flat"},
        {"name": "fc", "id": "fc1", "out": 6},
        {"name": "fc", "id": "fc2", "towers": "cross", "out": 3},
    ]
    reference, _strategy, module = _single_and_parallel(registries, 2, 5, 3, layers, layout)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for layer in ("conv1", "relu1", "fc1", "fc2"):
        assert _rel(reference.features(x, layer), module.features(x, layer)) <= 1e-12, layer
    with pytest.raises(KeyError):
        module.features(x, "nope")


TINY_LAYERS = [
    {"name": "conv", "id": "conv1", "towers": "cross", "out": 8, "kernel": 3, "padding": 1, "weight_init": "kaiming"},
    {"name": "relu"},
    {"name": "lrn", "impl": "reference"},
    {"name": "maxpool", "kernel": 2, "stride": 2},
    {"name": "conv", "id": "conv2", "out": 8, "kernel": 3, "padding": 1, "weight_init": "kaiming", "bias": 0.1},
    {"name": "relu"},
    {"name": "conv", "id": "conv3", "towers": "cross", "out": 8, "kernel": 3, "padding": 1, "weight_init": "kaiming"},
    {"name": "relu"},
    {"name": "maxpool", "kernel": 2, "stride": 2},
    {"name": "flatten"},
    {"name": "fc", "id": "fc4", "towers": "cross", "out": 16, "weight_init": "kaiming"},
    {"name": "relu"},
    {"name": "dropout", "p": 0.5},
    {"name": "fc", "id": "fc5", "towers": "cross", "out": 5, "weight_init": "kaiming"},
]


def _tiny(registries, strategy: dict, **train):
    recipe = _recipe(registries, TINY_LAYERS, 2, 16, 5, strategy)
    recipe.train.max_steps = train.get("max_steps")
    return recipe


def _final_model(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(out / "checkpoints" / "last.safetensors").items() if not k.startswith("rng/")}


@pytest.mark.parametrize("first,second", [("single", "model-parallel"), ("model-parallel", "single")])
def test_checkpoints_resume_across_strategies(registries, tmp_path: Path, first: str, second: str) -> None:
    """5 steps straight under single == 2 under one strategy + 3 resumed under the other."""
    strategies = {
        "single": {"strategy": "single", "device": "cpu"},
        "model-parallel": {"strategy": "model-parallel", "devices": ["cpu", "cpu"], "fuse_shared_devices": False},
    }
    Run(_tiny(registries, strategies["single"], max_steps=5), out=tmp_path / "straight", quiet=True).train()
    Run(_tiny(registries, strategies[first], max_steps=2), out=tmp_path / "a", quiet=True).train()
    Run(
        _tiny(registries, strategies[second], max_steps=5),
        out=tmp_path / "b",
        quiet=True,
        resume=tmp_path / "a" / "checkpoints" / "last.safetensors",
    ).train()
    straight, resumed = _final_model(tmp_path / "straight"), _final_model(tmp_path / "b")
    assert sorted(straight) == sorted(resumed)  # model and optimizer state, canonical names
    assert any(k.startswith("optimizer/") for k in straight)
    for k in straight:
        assert _rel(straight[k], resumed[k]) <= 1e-10, k
    losses = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    straight_losses = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    tail = {r["step"]: r["loss"] for r in straight_losses if r["kind"] == "train" and r["step"] > 2}
    got = {r["step"]: r["loss"] for r in losses if r["kind"] == "train"}
    assert got.keys() == tail.keys()
    assert all(abs(got[s] - tail[s]) <= 1e-10 * abs(tail[s]) for s in tail)


@attrs.define
class _AdamWOptions:
    lr: float = 0.01


def test_an_optimizer_with_a_0d_state_saves_and_resumes_under_model_parallel(tmp_path: Path) -> None:
    """AdamW keeps a 0-d ``step`` per parameter: not rows to split between towers or gather."""
    from convnet.core import plugins

    _, regs = plugins.create_manager()
    regs.current_plugin = ("test-adamw", "tests")
    regs.optimizer.add(
        "adamw", lambda o, ctx: torch.optim.AdamW([p for _, p in ctx.parameters], lr=o.lr), _AdamWOptions, "AdamW"
    )
    model_parallel = {"strategy": "model-parallel", "devices": ["cpu", "cpu"], "fuse_shared_devices": False}

    def recipe(strategy: dict, steps: int) -> Recipe:
        r = _recipe(regs, TINY_LAYERS, 2, 16, 5, strategy, optimizer={"name": "adamw"})
        r.train.max_steps = steps
        return r

    Run(
        recipe({"strategy": "single", "device": "cpu"}, 5), out=tmp_path / "straight", registries=regs, quiet=True
    ).train()
    Run(recipe(model_parallel, 2), out=tmp_path / "a", registries=regs, quiet=True).train()
    Run(
        recipe(model_parallel, 5),
        out=tmp_path / "b",
        registries=regs,
        quiet=True,
        resume=tmp_path / "a" / "checkpoints" / "last.safetensors",
    ).train()
    straight, resumed = _final_model(tmp_path / "straight"), _final_model(tmp_path / "b")
    steps = [k for k in straight if k.endswith("/step")]
    assert steps and all(straight[k].dim() == 0 and float(resumed[k]) == 5.0 for k in steps)
    assert sorted(straight) == sorted(resumed)
    for k in straight:
        assert _rel(straight[k], resumed[k]) <= 1e-10, k


def test_summary_shows_params_activations_and_exchanges_per_device(registries) -> None:
    recipe = _recipe(
        registries,
        TINY_LAYERS,
        2,
        16,
        5,
        {"strategy": "model-parallel", "devices": ["cpu", "cpu"], "fuse_shared_devices": False},
        dtype="float32",
    )
    info = summarize(recipe, registries)
    rows = info["devices"]
    assert [r["device"] for r in rows] == ["tower 0: cpu", "tower 1: cpu"]
    assert sum(r["params"] for r in rows) == info["params"]
    fc5 = 5 * 16 + 5  # the 5-class layer runs whole on tower 0
    assert rows[0]["params"] - rows[1]["params"] == fc5
    # Forward, floats received: conv3 reads the other tower's 4x8x8 block; fc4 reads
    # [8, 4, 4] flattened = 128 features, 64 from the other tower; fc5 (whole) gathers 8.
    conv3, fc4, fc5_in = 4 * 8 * 8, 64, 8
    assert rows[1]["exchanged_bytes_per_sample"] == 2 * 4 * (conv3 + fc4)
    assert rows[0]["exchanged_bytes_per_sample"] == 2 * 4 * (conv3 + fc4 + fc5_in)
    assert rows[0]["exchanged_bytes_per_step"] == 8 * rows[0]["exchanged_bytes_per_sample"]
    # Fused on one device: one group, nothing crosses a device boundary.
    fused = summarize(
        _recipe(
            registries,
            TINY_LAYERS,
            2,
            16,
            5,
            {"strategy": "model-parallel", "devices": ["cpu", "cpu"]},
            dtype="float32",
        ),
        registries,
    )["devices"]
    assert [(r["device"], r["params"], r["exchanged_bytes_per_step"]) for r in fused] == [
        ("towers 0+1: cpu", info["params"], 0)
    ]
    single = summarize(
        _recipe(registries, TINY_LAYERS, 2, 16, 5, {"strategy": "single", "device": "cpu"}, dtype="float32"), registries
    )["devices"]
    assert single[0]["exchanged_bytes_per_sample"] == 0


def test_ddp_summary_counts_the_gradient_all_reduce(registries, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    recipe = _recipe(registries, TINY_LAYERS, 2, 16, 5, {"strategy": "ddp", "device": "cpu"}, dtype="float32")
    info = summarize(recipe, registries)
    (row,) = info["devices"]
    assert row["device"].startswith("each of 4 ranks")
    assert row["params"] == info["params"]
    # a ring all-reduce sends and receives 2 (W-1)/W of the gradient bytes per rank
    assert row["exchanged_bytes_per_step"] == 2 * 3 * info["params"] * 4 // 4


def test_summary_command_line(capsys) -> None:
    assert (
        main(
            [
                "summary",
                "alexnet-digits",
                "--set",
                "parallel.strategy=model-parallel",
                "--set",
                'parallel.devices=["cpu", "cpu"]',
                "--set",
                "parallel.fuse_shared_devices=false",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "device tower 0: cpu:" in out and "device tower 1: cpu:" in out
    assert "bytes exchanged per step" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("strategy", ["model-parallel", "ddp"])
def test_show_and_summary_describe_a_gpu_recipe_on_a_machine_without_one(capsys, strategy: str) -> None:
    """The paper's two-GPU split can be read and planned anywhere; only running it needs the GPUs."""
    devices = 'parallel.devices=["cuda:0", "cuda:1"]' if strategy == "model-parallel" else "parallel.device=cuda"
    sets = ["--set", f"parallel.strategy={strategy}", "--set", devices]
    assert main(["summary", "alexnet-imagenet", *sets]) == 0
    out = capsys.readouterr().out
    assert ("device tower 1: cuda:1:" if strategy == "model-parallel" else "each of 2 ranks: cuda:0") in out
    assert main(["show", "alexnet-imagenet", *sets]) == 0 and f'strategy = "{strategy}"' in capsys.readouterr().out
    assert main(["run", "alexnet-digits", *sets]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def test_bad_device_lists_are_recipe_errors(registries) -> None:
    recipe = _tiny(registries, {"strategy": "model-parallel", "devices": ["cpu", "cpu", "cpu"]})
    with pytest.raises(RecipeError, match="devices has 3 entries but model.towers = 2"):
        build_strategy(recipe, registries)
    with pytest.raises(RecipeError, match="parallel.devices"):
        _tiny(registries, {"strategy": "model-parallel", "devices": ["not-a-device", "cpu"]})


def test_distributed_strategies_outside_torchrun_say_how_to_launch(registries, tmp_path: Path, monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for name in ("ddp", "tower-parallel"):
        recipe = _tiny(registries, {"strategy": name, "device": "cpu"}, max_steps=1)
        with pytest.raises(ConvnetError, match="launch it with torchrun"):
            Run(recipe, out=tmp_path / name, quiet=True).train()
        assert not (tmp_path / name).exists()  # the folder made for the run went with it


def test_one_process_strategies_under_torchrun_say_so(registries, tmp_path: Path, monkeypatch, capsys) -> None:
    """torchrun with "single" or "model-parallel" would train one independent copy per process;
    `convnet summary` with WORLD_SIZE set by hand still describes them."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for strategy in (
        {"strategy": "single", "device": "cpu"},
        {"strategy": "model-parallel", "devices": ["cpu", "cpu"]},
    ):
        recipe = _tiny(registries, strategy, max_steps=1)
        with pytest.raises(RecipeError, match=r'^parallel.strategy = "[a-z-]+" runs in one process, but torchrun'):
            Run(recipe, out=tmp_path / strategy["strategy"], quiet=True).train()
        assert not (tmp_path / strategy["strategy"] / "checkpoints").exists()
        assert summarize(recipe, registries)["devices"]
    assert main(["summary", "alexnet-digits"]) == 0 and capsys.readouterr().out


def test_a_resume_into_another_number_of_optimizer_groups_is_refused(tmp_path: Path) -> None:
    """An optimizer with a group per parameter has more groups under model-parallel (a piece per
    tower): settings matched by position would reach the wrong parameters, so the resume stops."""
    from convnet.core import plugins

    _, regs = plugins.create_manager()
    regs.current_plugin = ("test-groups", "tests")
    regs.optimizer.add(
        "per-param",
        lambda o, ctx: torch.optim.SGD([{"params": [p]} for _, p in ctx.parameters], lr=o.lr),
        _AdamWOptions,
        "SGD, a group per parameter",
    )
    optimizer = {"name": "per-param"}
    single = _recipe(regs, TINY_LAYERS, 2, 16, 5, {"strategy": "single", "device": "cpu"}, optimizer=optimizer)
    single.train.max_steps = 2
    Run(single, out=tmp_path / "a", registries=regs, quiet=True).train()
    towers = {"strategy": "model-parallel", "devices": ["cpu", "cpu"], "fuse_shared_devices": False}
    split = _recipe(regs, TINY_LAYERS, 2, 16, 5, towers, optimizer=optimizer)
    last = tmp_path / "a" / "checkpoints" / "last.safetensors"
    with pytest.raises(
        cn.CheckpointError, match=r"saved by an optimizer with \d+ parameter group\(s\); this run's has"
    ):
        Run(split, out=tmp_path / "a", registries=regs, quiet=True, resume=last).train()


def test_tower_parallel_summary_counts_whole_layers_and_gathers_on_every_rank(registries) -> None:
    """Every tower-parallel rank holds the whole layers and gathers before them: with a 5-class
    last layer that cannot split in 2 towers, both ranks hold it and both receive the gather."""
    recipe = _recipe(
        registries, TINY_LAYERS, 2, 16, 5, {"strategy": "tower-parallel", "device": "cpu"}, dtype="float32"
    )
    rows = summarize(recipe, registries)["devices"]
    assert len(rows) == 2 and rows[0] == {**rows[1], "device": rows[0]["device"]}
    whole = cn.build_model(recipe, "meta", registries).layers["fc5"]
    assert rows[0]["params"] > sum(p.numel() for p in whole.parameters()) > 0
    assert rows[1]["exchanged_bytes_per_sample"] > 0
