"""AlexNet-specific tools: torchvision weight conversion (``torchvision_weights``, the
``convnet convert`` command), the paper's ablations as pairs of recipes (``ablate``) and its
Figure 3 tower-specialisation experiment (``towers``, the ``convnet towers`` command).
No component is registered here: the network itself is the ``alexnet-*`` recipes, built
from the generic layer plugins."""

from __future__ import annotations

import argparse

from convnet.core import add_overrides_argument, hookimpl, load_plugins

# The recipe `convnet convert` puts torchvision's weights in: its network, fed as they expect.
RECIPE = "alexnet-torchvision-weights"


def _convert(args: argparse.Namespace) -> int:
    from convnet.plugins.alexnet.torchvision_weights import convert_file

    path = convert_file(args.source, args.out, args.recipe, load_plugins(strict=args.strict), args.overrides)
    print(f"{args.source} -> {path} (recipe {args.recipe})")
    return 0


@hookimpl
def convnet_add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="torchvision alexnet weights (.pth or .safetensors) -> convnet weights")
    p.add_argument(
        "source", metavar="FILE", help="torchvision alexnet state_dict (.pth read weights-only, or .safetensors)"
    )
    p.add_argument("--out", metavar="FILE", required=True, help="convnet weights file to write (.safetensors)")
    p.add_argument(
        "--recipe",
        default=RECIPE,
        help=f"recipe whose network receives the weights (default {RECIPE}: torchvision's input normalisation)",
    )
    add_overrides_argument(p, help="override a value of that recipe (repeatable)")
    p.set_defaults(handler=_convert)

    from convnet.plugins.alexnet import towers

    t = subparsers.add_parser(
        "towers",
        help="the paper's Figure 3: train alexnet-photos and its one-tower control over seeds, "
        "compare the towers' colour specificity",
        description=towers.__doc__.split("\n\n")[0],
    )
    towers.add_arguments(t)
    t.set_defaults(handler=towers.command)
