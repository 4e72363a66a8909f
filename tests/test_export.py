"""``convnet export``: a torch.export program (.pt2) and ONNX (LRN as ONNX's LRN) that give the
eager network's logits within 1e-4, at another batch size than the one traced.

The ONNX tests need the ``export`` extra (onnx, onnxscript, onnxruntime) and skip without it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import convnet.core as cn
from convnet.core import checkpoint as ckpt
from convnet.core.cli import main
from convnet.core.export import load_network
from convnet.core.model import build_model
from convnet.core.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A real (one-step) training run's checkpoint."""
    out = tmp_path_factory.mktemp("digits-run")
    cn.train(cn.load_recipe("alexnet-digits", ["train.max_steps=1"]), out=out, quiet=True)
    return out / "checkpoints" / "last.safetensors"


@pytest.fixture(scope="module")
def paper_checkpoint(tmp_path_factory, registries) -> Path:
    """The paper's network, initialised as its recipe says, written as a convnet checkpoint."""
    torch.manual_seed(0)
    model = build_model(load_recipe("alexnet-imagenet", [], registries), "cpu", registries)
    path = tmp_path_factory.mktemp("paper") / "init.safetensors"
    ckpt.save(path, {f"model/{k}": v for k, v in model.state_dict().items()}, {})
    return path


def _eager(recipe_name: str, checkpoint: Path, registries, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    recipe = load_recipe(recipe_name, [], registries)
    network = load_network(recipe, checkpoint, registries)
    x = torch.randn((batch, *recipe.model.input), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return x, network(x)


def _export(recipe: str, checkpoint: Path, fmt: str, out: Path, capsys) -> str:
    assert main(["export", recipe, "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    return capsys.readouterr().out


def test_torch_program_gives_the_eager_logits(digits_checkpoint, registries, tmp_path, capsys):
    out = tmp_path / "digits.pt2"
    printed = _export("alexnet-digits", digits_checkpoint, "torch", out, capsys)
    assert "largest logit difference" in printed
    program = torch.export.load(out)  # our own file, written just above
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("convnet.lrn_forward.default") == 2
    x, expected = _eager("alexnet-digits", digits_checkpoint, registries, batch=5)
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=TOL)


def _onnx_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _lrn_nodes(path: Path) -> list[dict]:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path))
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for node in model.graph.node
        if node.op_type == "LRN"
    ]


@pytest.mark.parametrize("recipe", ["alexnet-digits", "alexnet-imagenet"])
def test_onnx_maps_lrn_to_onnx_lrn_and_gives_the_eager_logits(
    recipe, digits_checkpoint, paper_checkpoint, registries, tmp_path, capsys
):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    checkpoint = digits_checkpoint if recipe == "alexnet-digits" else paper_checkpoint
    out = tmp_path / "model.onnx"
    printed = _export(recipe, checkpoint, "onnx", out, capsys)
    assert "largest logit difference from eager" in printed
    nodes = _lrn_nodes(out)
    assert len(nodes) == 2, "conv1's and conv2's LRN"
    for node in nodes:  # ONNX divides alpha by size: the paper's 1e-4 on the sum is 5e-4 there
        assert node["size"] == 5 and node["alpha"] == pytest.approx(5e-4) and node["bias"] == pytest.approx(2.0)
    x, expected = _eager(recipe, checkpoint, registries, batch=3)
    torch.testing.assert_close(_onnx_logits(out, x), expected, rtol=0, atol=TOL)


def test_onnx_refuses_an_even_lrn_size_in_one_line(digits_checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    code = main(
        [
            "export",
            "alexnet-digits",
            "--checkpoint",
            str(digits_checkpoint),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "m.onnx"),
            "--set",
            "model.layers[2].size=4",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "even size (4)" in err and "Traceback" not in err


def test_bad_checkpoint_and_bad_out_are_one_line_errors(digits_checkpoint, tmp_path, capsys):
    assert (
        main(
            [
                "export",
                "alexnet-imagenet",
                "--checkpoint",
                str(digits_checkpoint),
                "--format",
                "torch",
                "--out",
                str(tmp_path / "m.pt2"),
            ]
        )
        == 1
    )
    assert "another recipe's checkpoint" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "alexnet-digits",
                "--checkpoint",
                str(digits_checkpoint),
                "--format",
                "torch",
                "--out",
                str(tmp_path / "m.bin"),
            ]
        )
        == 2
    )
    assert ".pt2" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "alexnet-digits",
                "--checkpoint",
                str(tmp_path / "none.safetensors"),
                "--format",
                "torch",
                "--out",
                str(tmp_path / "m.pt2"),
            ]
        )
        == 1
    )
    assert "no such checkpoint file" in capsys.readouterr().err


def test_an_out_that_cannot_be_written_is_one_line_before_the_export(digits_checkpoint, tmp_path, capsys):
    (tmp_path / "folder.pt2").mkdir()
    (tmp_path / "a-file").write_text("x")
    for out, says in [
        (tmp_path / "folder.pt2", "is a folder; give --out a file name"),
        (tmp_path / "a-file" / "m.pt2", "cannot write there"),
    ]:
        args = ["export", "alexnet-digits", "--checkpoint", str(digits_checkpoint), "--format", "torch"]
        assert main([*args, "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"convnet: error: {out}: {says}"), err


def test_onnx_of_a_float64_network_is_written_even_where_onnxruntime_cannot_check_it(registries, tmp_path, capsys):
    """onnxruntime's CPU provider has no float64 convolution: the file is written and the line
    says why it was not checked, instead of a traceback."""
    for module in ("onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    sets = ["model.dtype=float64"]
    torch.manual_seed(0)
    model = build_model(load_recipe("alexnet-digits", sets, registries), "cpu", registries)
    checkpoint = tmp_path / "f64.safetensors"
    ckpt.save(checkpoint, {f"model/{k}": v for k, v in model.state_dict().items()}, {})
    out = tmp_path / "f64.onnx"
    args = ["export", "alexnet-digits", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]
    assert main([*args, "--set", sets[0]]) == 0
    printed = capsys.readouterr().out
    assert out.is_file()
    difference = re.search(r"largest logit difference from eager on a random batch: (\S+)", printed)
    assert (difference and float(difference.group(1)) <= TOL) or "not checked (onnxruntime cannot run it: " in printed
