"""The ``convnet`` command line. Exit codes: 0 success, 2 bad recipe or command line, 1 else."""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from convnet.core.command_args import add_recipe_arguments
from convnet.core.errors import ConvnetError, PluginError, RecipeError

if TYPE_CHECKING:
    from convnet.core.registry import Registries
    from convnet.core.schema import Recipe

EPILOG = "RECIPE is a bundled recipe's name (see `convnet recipes`) or a path to a .toml file."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 as well
        for problem in COMMAND_PROBLEMS:  # why a plugin's command may be missing from the choices
            print(f"convnet: warning: {problem}", file=sys.stderr)
        self.print_usage(sys.stderr)
        print(f"convnet: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convnet", description="Train and evaluate the 2012 ImageNet network, piece by piece.", epilog=EPILOG
    )
    parser.add_argument("--strict", action="store_true", help="fail when any plugin fails to load")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="train a recipe", epilog=EPILOG)
    add_recipe_arguments(p)
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<recipe>/<time>)")
    p.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue from a checkpoint, in the run folder it was saved in unless --out says otherwise",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out folder that holds another run, replacing its files",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")

    p = sub.add_parser("show", help="print the fully resolved recipe as TOML", epilog=EPILOG)
    add_recipe_arguments(p)

    p = sub.add_parser("summary", help="per layer: shapes, parameters, multiply-adds, towers", epilog=EPILOG)
    add_recipe_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("plugins", help="every registered component by kind, with its plugin, hooks and commands")
    p.add_argument("kind", nargs="?", metavar="KIND", help="with NAME: show that component's options")
    p.add_argument("name", nargs="?", metavar="NAME", help="a registered component of KIND")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    sub.add_parser("recipes", help="the bundled recipes, one line each")

    p = sub.add_parser(
        "stats", help="mean image and RGB PCA of the training set, for the recipe's augmenters", epilog=EPILOG
    )
    add_recipe_arguments(p)
    p.add_argument(
        "--out",
        metavar="FILE",
        help="safetensors file to write (default: next to the dataset, "
        "<data.dataset.root>/stats.safetensors; without a root, the file the recipe's augmenters "
        "name in their `stats` option, else runs/<recipe>/stats.safetensors)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per streamed batch (memory bound)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="use N training images spread over the split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="replace an existing statistics file that differs")

    p = sub.add_parser("predict", help="the top-5 classes of image files, with a trained checkpoint", epilog=EPILOG)
    add_recipe_arguments(p)
    p.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint of this recipe's model")
    p.add_argument("--json", action="store_true", help='one JSON object a line: {"file", "top5": [[name, p]...]}')
    p.add_argument("--plot", metavar="FILE.png", help="draw the images with their top-5 bars (the paper's Fig. 4)")

    p = sub.add_parser("eval", help="run a recipe's evaluators on checkpoints (several = ensemble)", epilog=EPILOG)
    add_recipe_arguments(p)
    p.add_argument(
        "--checkpoint",
        dest="checkpoints",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="checkpoint(s) of this recipe's model; with several, their softmax is averaged",
    )
    p.add_argument("--out", metavar="DIR", help="where eval.json and images go (default runs/<recipe>/eval-<time>)")

    p = sub.add_parser(
        "export", help="a trained network for serving: torch.export program (.pt2) or ONNX", epilog=EPILOG
    )
    add_recipe_arguments(p)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint of this recipe's model")
    p.add_argument(
        "--format",
        required=True,
        choices=["torch", "onnx"],
        help="torch: torch.export.save (.pt2); onnx: ONNX (needs the 'export' extra)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="file to write")

    p = sub.add_parser("report", help="learning curves (PNG) and index.html for a run folder")
    p.add_argument("run_folder", metavar="RUN_FOLDER", help="a run folder (holds metrics.jsonl)")

    p = sub.add_parser(
        "build-kernels", help="build the C++/CUDA kernels (LRN, max-pool, paper-sgd step) ahead of first use"
    )
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="build only the components with this name, e.g. cpu (repeatable)",
    )
    _plugin_commands(sub)
    return parser


def _plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands that plugins add through the ``convnet_add_commands`` hook."""
    from convnet.core import plugins

    pm = plugins.manager()  # load problems are reported once, by main
    for impl in pm.hook.convnet_add_commands.get_hookimpls():
        try:
            impl.function(subparsers=sub)
        except Exception as exc:  # one plugin's bad command must not take the CLI down
            COMMAND_PROBLEMS.append(
                f"plugin {impl.plugin_name!r} could not add its commands: {type(exc).__name__}: {exc}"
            )


# Plugins whose commands could not be added while the parser was built (before --strict is
# known): main reports them with the other plugin problems, and --strict makes them fatal.
COMMAND_PROBLEMS: list[str] = []


def main(argv: Sequence[str] | None = None) -> int:
    from convnet.core import plugins

    COMMAND_PROBLEMS.clear()
    args = build_parser().parse_args(argv)
    try:
        regs = plugins.registries(strict=args.strict)
        plugins.report_problems(regs)  # nothing about plugins is silent
        for problem in COMMAND_PROBLEMS:
            if args.strict:
                raise PluginError(problem)
            print(f"convnet: warning: {problem}", file=sys.stderr)
            if problem not in regs.problems:
                regs.problems.append(problem)  # `convnet plugins --json` lists it
        handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
        if handler is None:
            print(f"convnet: error: command {args.command!r} (from a plugin) has no handler", file=sys.stderr)
            return 2
        code = handler(args)
        sys.stdout.flush()  # here, not at the interpreter's exit: a reader that left is handled below
        return code
    except ConvnetError as exc:
        hint = _provenance(exc, args)
        # One write for the whole message: print() writes a multi-line message and its final
        # newline separately, and under torchrun another rank's line can land between the two
        # (it did, in the middle of the printed resume command).
        sys.stderr.write(f"convnet: error: {hint or exc}\n")
        sys.stderr.flush()
        if exc.exit_now:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        print("convnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if not _stdout_closed():  # another pipe (a plugin's socket, a worker's): not the reader
            return _unexpected(exc)
        # `convnet plugins | head -1`: the reader left. Quietly, as a pipe's writer does; stdout
        # goes to /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:
        return _unexpected(exc)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # not a file: not a pipe either
        return False


def _unexpected(exc: Exception) -> int:
    """An exception no convnet code turned into a message: a third-party plugin's bug gets its
    traceback (its author needs it), then one line naming it; convnet's own is re-raised."""
    from convnet.core import plugins

    who = plugins.culprit(exc)
    if who is None:
        raise exc
    traceback.print_exception(exc)
    reason = (str(exc).strip().splitlines() or [""])[-1][:300]  # a worker's: its traceback's last line
    reason = reason.removeprefix(f"{type(exc).__name__}: ")
    sys.stderr.write(f"convnet: error: {who} failed: {type(exc).__name__}: {reason}\n")
    return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("convnet")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    try:
        import torch

        theirs = torch.__version__
    except ImportError:
        theirs = "not installed"
    return f"convnet {ours} (torch {theirs})"


def _registries(args: argparse.Namespace):
    from convnet.core import plugins

    return plugins.registries(strict=args.strict)


def _check_disabled(recipe: Recipe, registries: Registries) -> None:
    """``plugins.disable`` as ``run`` checks it: a recipe shown or summarised is one that runs."""
    from convnet.core import plugins

    plugins.hooks_without(plugins.manager(), recipe.plugins.disable, registries)


def _provenance(exc: ConvnetError, args: argparse.Namespace) -> str | None:
    """For a component no plugin here provides: the distribution that supplied it to the run
    being resumed or evaluated (its checkpoint or run folder says), and how to install it."""
    from pathlib import Path

    from convnet.core.run_folder import provenance_hint

    unknown = getattr(exc, "unknowns", None) or ([exc.unknown] if getattr(exc, "unknown", None) else [])
    if not unknown:
        return None
    sources = [
        getattr(args, "resume", None),
        *(getattr(args, "checkpoints", None) or []),
        getattr(args, "recipe", None),
        getattr(args, "run_folder", None),
    ]
    return provenance_hint(unknown, [Path(s) for s in sources if s])


def cmd_run(args: argparse.Namespace) -> int:
    from convnet.core import plugins
    from convnet.core.engine import Run
    from convnet.core.recipe import load_recipe

    regs = _registries(args)
    recipe = load_recipe(args.recipe, args.overrides, regs)
    run = Run(
        recipe,
        out=args.out,
        resume=args.resume,
        quiet=args.quiet,
        registries=regs,
        pm=plugins.manager(args.strict),
        recipe_ref=args.recipe,
        overrides=tuple(args.overrides),
        overwrite=args.overwrite,
        command=shlex.join(["convnet", *sys.argv[1:]]),
    )
    summary = run.train()
    if run.strategy.is_main:
        parts = [
            f"{k.replace('_error', '')} error {summary[k] * 100:.2f}%"
            for k in summary
            if k.startswith("top") and k.endswith("_error")
        ]
        print(f"{recipe.name}: validation {', '.join(parts) or '(no top-k evaluator)'} after {summary['step']} steps")
        print(f"run folder: {summary['out']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from convnet.core.recipe import load_recipe, to_toml
    from convnet.core.strategy import devices_not_needed

    regs = _registries(args)
    with devices_not_needed():
        recipe = load_recipe(args.recipe, args.overrides, regs)
    _check_disabled(recipe, regs)
    print(to_toml(recipe, regs), end="")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from convnet.core.recipe import load_recipe
    from convnet.core.strategy import devices_not_needed
    from convnet.core.summary import format_summary, summarize

    regs = _registries(args)
    with devices_not_needed():
        recipe = load_recipe(args.recipe, args.overrides, regs)
        _check_disabled(recipe, regs)
        info = summarize(recipe, regs)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from convnet.core import plugins
    from convnet.core.discovery import describe_component, plugin_table

    regs = _registries(args)
    if args.kind is not None:
        if args.name is None:
            raise RecipeError("plugins: give a KIND and a NAME, e.g. `convnet plugins layer conv`")
        info = describe_component(regs, args.kind, args.name)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(
                f"{info['kind']} {info['name']}: {info['description']}  [{info['plugin']} from {info['distribution']}]"
            )
            for opt in info["options"] or [{"name": "(no options)", "type": "", "default": ""}]:
                default = "" if opt["default"] == "" else f" = {opt['default']}"
                print(f"  {opt['name']}: {opt['type']}{default}")
        return 0
    rows = [
        {"kind": kind, "name": e.name, "description": e.description, "plugin": e.plugin, "distribution": e.distribution}
        for kind, reg in regs.items()
        for e in reg
    ]
    table = plugin_table(plugins.manager(args.strict), regs)
    if args.json:
        print(json.dumps({"components": rows, "plugins": table, "problems": regs.problems}, indent=2))
        return 0
    for kind, reg in regs.items():
        print(f"{kind}:")
        for e in reg:
            print(f"  {e.name:<18} {e.description}  [{e.plugin} from {e.distribution}]")
    print("plugins:")
    for row in table:
        extra = [
            f"hooks: {', '.join(row['hooks'])}" if row["hooks"] else "",
            f"commands: {', '.join(row['commands'])}" if row["commands"] else "",
        ]
        print(f"  {row['name']:<18} {row['distribution']}  {'; '.join(e for e in extra if e)}".rstrip())
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from convnet.core.recipe import bundled_names, load_raw

    for name in bundled_names():
        raw, _ = load_raw(name)
        print(f"{name:<24} {raw.get('description', '')}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from convnet.core import stats
    from convnet.core.recipe import load_recipe

    if args.batch_size <= 0 or args.limit < 0:
        raise RecipeError("--batch-size must be > 0 and --limit >= 0")
    regs = _registries(args)
    recipe = load_recipe(args.recipe, args.overrides, regs)
    out = args.out or stats.default_out(recipe)
    note = stats.check_target(out, args.force)
    if note:
        print(note, file=sys.stderr)
    tensors, summary = stats.compute(recipe, regs, args.batch_size, args.limit, progress=not args.quiet)
    path, outcome = stats.save_checked(out, tensors, summary, recipe.name, args.force)
    print(
        f"{recipe.name}: {summary['images']} images ({summary['skipped']} unreadable skipped), "
        f"RGB mean {summary['rgb_mean']}, eigenvalues {summary['eigvals']}"
    )
    print(f"statistics: {path} ({outcome})")
    elsewhere = {k: v for k, v in stats.readers(recipe).items() if Path(v).resolve() != Path(path).resolve()}
    if elsewhere:
        print(
            f"note: this recipe's augmenters read {', '.join(sorted(set(elsewhere.values())))}; to use these "
            "statistics, run with " + " ".join(f"--set {k}={path}" for k in elsewhere)
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from convnet.core.predict import format_text, plot, plot_path, predict
    from convnet.core.recipe import load_recipe

    if args.plot:
        args.plot = plot_path(args.plot, args.files)
    regs = _registries(args)
    recipe = load_recipe(args.recipe, args.overrides, regs)
    results = predict(recipe, args.checkpoint, args.files, regs)
    for r in results:
        if r.error is not None:
            print(f"convnet: error: {r.error}", file=sys.stderr, flush=True)
        elif args.json:
            print(json.dumps(r.as_json()), flush=True)
        else:
            print(format_text(r), flush=True)
    if args.plot and any(r.error is None for r in results):
        print(f"plot: {plot(results, args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 1 if any(r.error is not None for r in results) else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from convnet.core.evaluate_cmd import evaluate
    from convnet.core.recipe import load_recipe

    regs = _registries(args)
    recipe = load_recipe(args.recipe, args.overrides, regs)
    results = evaluate(recipe, args.checkpoints, args.out, regs)
    if results:  # the main process only
        print(json.dumps(results, indent=2))
        if len(args.checkpoints) > 1:
            print(
                f"the plain metrics are of the first checkpoint, {results['metrics_from']}; the ensemble_* "
                f"ones of all {len(args.checkpoints)}",
                file=sys.stderr,
            )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from convnet.core.report import render

    for path in render(args.run_folder):
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from convnet.core.export import export
    from convnet.core.recipe import load_recipe

    regs = _registries(args)
    recipe = load_recipe(args.recipe, args.overrides, regs)
    done = export(recipe, args.checkpoint, args.out, args.format, regs)
    check = (
        f"not checked ({done.unchecked})"
        if done.max_difference is None
        else f"largest logit difference from eager on a random batch: {done.max_difference:.2e}"
    )
    print(f"{done.path}: {recipe.name} as {done.format}; {check}")
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    """Every registered component whose factory has a ``build`` step (a compiled kernel) runs it."""
    regs = _registries(args)
    buildable = [(kind, entry) for kind, reg in regs.items() for entry in reg if hasattr(entry.factory, "build")]
    unknown = sorted(set(args.only or ()) - {entry.name for _, entry in buildable})
    if unknown:
        names = ", ".join(sorted({entry.name for _, entry in buildable}))
        raise RecipeError(f"--only: no kernel named {', '.join(map(repr, unknown))}; the kernels are: {names}")
    failed = 0
    for kind, entry in buildable:
        if args.only and entry.name not in args.only:
            continue
        try:
            status = entry.factory.build(verbose=args.verbose)
        except Exception as exc:
            failed += 1
            status = f"FAILED: {exc}"
        print(f"{kind} {entry.name}: {status}", flush=True)
    return 1 if failed else 0


COMMANDS = {
    "run": cmd_run,
    "show": cmd_show,
    "summary": cmd_summary,
    "plugins": cmd_plugins,
    "recipes": cmd_recipes,
    "stats": cmd_stats,
    "predict": cmd_predict,
    "eval": cmd_eval,
    "report": cmd_report,
    "export": cmd_export,
    "build-kernels": cmd_build_kernels,
}
