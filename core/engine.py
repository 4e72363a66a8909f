"""The train loop: epochs of steps, evaluation, schedule, checkpoints, metrics, hooks.

``Run`` keeps only the loop. Building the components (``components``), the run folder
(``run_folder``), checkpoint IO (``run_checkpoint``), the position (``train_state``) and the
metrics file (``metrics_file``) each live in their own module.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import nn

from convnet.core import cpu_memory, keyed, plugins, run_folder, schema
from convnet.core import data as cdata
from convnet.core.components import Components, build_components, build_strategy, check_launch, checkpoint_room
from convnet.core.data import augment_batch
from convnet.core.errors import ConvnetError, NonFiniteLossError
from convnet.core.evaluation import EvalContext, run_evaluators
from convnet.core.metrics_file import MetricsFile
from convnet.core.recipe import to_toml
from convnet.core.registry import Registries
from convnet.core.run_checkpoint import RunCheckpoints
from convnet.core.run_view import RunView
from convnet.core.train_state import TrainState

__all__ = ["Interrupted", "Run", "build_strategy", "train"]


# Under torchrun, a second SIGINT within this many seconds of the first is the same Ctrl-C, forwarded.
SECOND_CTRL_C_S = 1.0


class Interrupted(ConvnetError):
    """Ctrl-C: a checkpoint was saved at a step boundary; exit code 130."""

    exit_code = 130


class Run:
    """One training run. Plugins see it through ``self.view`` (a read-only ``RunView``)."""

    def __init__(
        self,
        recipe: schema.Recipe,
        out: str | Path | None = None,
        resume: str | Path | None = None,
        quiet: bool = False,
        registries: Registries | None = None,
        pm: pluggy.PluginManager | None = None,
        recipe_ref: str | None = None,
        overrides: tuple[str, ...] = (),
        overwrite: bool = False,
        command: str | None = None,
    ) -> None:
        self.recipe = recipe
        self.registries = registries if registries is not None else plugins.registries()
        self.pm = pm if pm is not None else plugins.manager()
        self.hooks = plugins.hooks_without(self.pm, recipe.plugins.disable, self.registries)
        self.quiet, self.overwrite = quiet, overwrite
        self.recipe_ref = recipe_ref or recipe.name
        self.overrides = overrides
        self.command = command or shlex.join(["convnet", "run", self.recipe_ref, *(f"--set={s}" for s in overrides)])
        self.strategy = build_strategy(recipe, self.registries)
        self.resume_from = Path(resume) if resume is not None else None
        self.out = Path(out) if out is not None else None
        self.state = TrainState()
        self.total_steps = 0
        self.view = RunView(self)
        self._interrupt = False  # this process heard Ctrl-C
        self._interrupted_at = 0.0
        self._stop = False  # some process heard it: agreed by every process at a step
        self._claim: run_folder.Claim | None = None
        self._fresh = False  # the run folder was made for this run (removed again if it never starts)
        self._started = False
        self._monitor_warned = False

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        r = self.recipe
        if r.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # cudnn.benchmark picks kernels by timing them, so it is only honoured when not deterministic.
        torch.backends.cudnn.benchmark = r.train.cudnn_benchmark and not r.train.deterministic
        torch.manual_seed(r.seed)
        cdata.seed_global_generators(r.seed)
        if r.train.reuse_cpu_memory and not cpu_memory.reuse_freed_memory() and self.strategy.is_main:
            print(
                "convnet: note: train.reuse_cpu_memory works with glibc's malloc only; this C library's "
                "allocator is used as it is",
                file=sys.stderr,
            )
        check_launch(self.strategy, r)
        self._claim_folder()
        self.parts: Components = build_components(r, self.registries, self.strategy)
        self.dtype = next(iter(self.parts.module.parameters())).dtype
        self.memory_format = torch.channels_last if r.train.channels_last else torch.contiguous_format
        self.total_steps = self.parts.steps_per_epoch * r.train.epochs
        if r.train.max_steps:
            self.total_steps = min(self.total_steps, r.train.max_steps)
        recipe_toml = to_toml(r, self.registries)
        components = run_folder.components_used(r, self.registries)
        self.checkpoints = RunCheckpoints(self.out, self.strategy, recipe_toml, components)
        self.metrics = MetricsFile(self.out / "metrics.jsonl", enabled=self.strategy.is_main)
        if self.resume_from is not None:
            self.state, plugin_state = self.checkpoints.restore(self.resume_from, self.parts, r, self.registries)
            self._load_plugin_state(plugin_state)
        if self._claim is not None:  # the new run could be built and resumed: now the old one may go
            if self._claim.overwritten:
                self._check_train_input()
            self._claim.replace_overwritten()
        if self.resume_from is not None:
            self.metrics.trim(self.state.step, self.state.batch_in_epoch >= self.parts.steps_per_epoch)
        if self.strategy.is_main:
            (self.out / "recipe.toml").write_text(recipe_toml, encoding="utf-8")
            run_folder.write_run_json(self.out, r, self.registries, self.command)

    def _check_train_input(self) -> None:
        """One training sample through copies of the train augmenters, so that images not of
        model.input's shape stop the run before --overwrite replaces the old one (the first step
        would find them only after). Anything else that goes wrong here is left to the loop."""
        try:
            train = self.parts.splits.train
            sample = next((s for s in map(train.__getitem__, range(min(len(train), 8))) if s is not None), None)
            if sample is None:
                return
            image = torch.as_tensor(sample[0])
            for aug in copy.deepcopy(self.parts.train_augmenters):
                image = aug(image, torch.Generator().manual_seed(0))
        except Exception:
            return
        cdata.check_input_shape(image, self.recipe.model.input, "data.dataset and data.train_augment")

    def _claim_folder(self) -> None:
        """The run folder: fresh and exclusive unless given; locked; room for a checkpoint checked
        before anything is allocated or read (a full disk costs nothing)."""
        if self.out is None and self.resume_from is not None:  # continue the checkpoint's own run folder
            self.out = run_folder.resumed_folder(self.resume_from)
        if not self.strategy.is_main:
            self.out = self.out or run_folder.default_folder(self.recipe.name)
            return
        if self.out is None:
            self.out = run_folder.fresh_folder(run_folder.default_folder(self.recipe.name).parent)
            self._fresh = True
        elif not self.out.exists():
            self._fresh = True  # made here: a start that fails removes it again
        self._claim = run_folder.claim(
            self.out, resume=self.resume_from is not None, overwrite=self.overwrite, checkpoint=self.resume_from
        )
        room = checkpoint_room(self.recipe, self.registries)
        check_writable(self.out, needed_bytes=max(0, room - self._claim.overwritten_bytes()))

    # ------------------------------------------------------------------ plugin state
    def _plugin_state(self) -> dict[str, dict[str, Any]]:
        saved = {}
        for impl in self.pm.hook.convnet_save_state.get_hookimpls():
            if impl.plugin_name in self.recipe.plugins.disable:
                continue
            state = impl.function(run=self.view)
            if state is not None:
                saved[impl.plugin_name] = dict(state)
        return saved

    def _load_plugin_state(self, saved: dict[str, dict[str, Any]]) -> None:
        for impl in self.pm.hook.convnet_load_state.get_hookimpls():
            if impl.plugin_name in saved and impl.plugin_name not in self.recipe.plugins.disable:
                impl.function(run=self.view, state=saved[impl.plugin_name])

    def save_checkpoint(self, which: str = "last") -> Path:
        return self.checkpoints.save(which, self.parts, self.state, self._plugin_state())

    def checkpoint_path(self, which: str = "last") -> Path:
        return self.checkpoints.path(which)

    # ------------------------------------------------------------------ run
    def lr(self) -> float:
        return float(self.parts.optimizer.param_groups[0]["lr"])

    def resume_command(self) -> str:
        """The command that continues this run (under torchrun: the same launch, resuming)."""
        sets = " ".join(f"--set {shlex.quote(s)}" for s in self.overrides)
        command = (
            f"run {shlex.quote(self.recipe_ref)} {sets + ' ' if sets else ''}"
            f"--out {shlex.quote(str(self.out))} --resume {shlex.quote(str(self.checkpoint_path()))}"
        )
        world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if world <= 1:
            return f"convnet {command}"
        launch = f"torchrun --standalone --nproc-per-node={local}"
        if world != local:
            launch = f"torchrun --nnodes={world // local} --nproc-per-node={local} (and your rendezvous options)"
        return f"{launch} -m convnet.core {command}"

    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        except RuntimeError as exc:  # a lost peer under a multi-process strategy: one clear line
            error = self.strategy.translate_error(exc)
            self.strategy.abandon()
            if error is None:
                raise
            raise error from exc
        except BaseException:
            self.strategy.abandon()
            raise
        finally:
            if self._claim is not None:
                if self._fresh and not self._started:  # under the lock: no one can take the folder meanwhile
                    run_folder.remove_if_unused(self.out)
                self._claim.lock.release()

    def _train(self) -> dict[str, Any]:
        self._setup()
        self._started = True
        unwatch = self._note_hooks_outputs()
        try:
            summary = self._run()
        finally:
            unwatch()
        self.strategy.close()
        return summary

    def _note_hooks_outputs(self) -> Callable[[], None]:
        """While the run lasts, the top-level entries a hook makes in the run folder (a plugin's
        tensorboard/) are noted as the run's (``.outputs``); returns the undo."""
        claim = self._claim
        if claim is None:
            return lambda: None
        before: list[set[str]] = []
        return self.pm.add_hookcall_monitoring(
            lambda name, impls, kwargs: before.append(claim.names()),
            lambda outcome, name, impls, kwargs: claim.note_since(before.pop()),
        )

    def _run(self) -> dict[str, Any]:
        old_handler = None
        if threading.current_thread() is threading.main_thread():  # every rank: the stop is agreed
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self.hooks.convnet_train_start(run=self.view)
            summary = self._loop()
        except BaseException as exc:  # observers (progress bars) still hear that the run ended
            self.hooks.convnet_train_end(
                run=self.view,
                summary={"out": str(self.out), "step": self.state.step, "error": f"{type(exc).__name__}: {exc}"},
            )
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        self._report()
        self.hooks.convnet_train_end(run=self.view, summary=summary)
        return summary

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # torchrun forwards the terminal's Ctrl-C to its workers, which heard it already: there
        # one Ctrl-C may arrive twice, so only a second one a moment later means "stop now".
        now = time.monotonic()
        same = SECOND_CTRL_C_S if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
        if self._interrupt and now - self._interrupted_at > same:
            raise KeyboardInterrupt
        if not self._interrupt:
            self._interrupt, self._interrupted_at = True, now

    def _stop_if_interrupted(self) -> None:
        """Raise ``Interrupted`` when the processes agreed to stop (after the checkpoint was saved)."""
        if not self._stop:
            return
        if not self.strategy.is_main:
            raise Interrupted(f"interrupted at step {self.state.step} (the main process saved the checkpoint)")
        raise Interrupted(
            f"interrupted at step {self.state.step}; checkpoint saved to {self.checkpoint_path()}\n"
            f"resume with: {self.resume_command()}"
        )

    def _report(self, live: bool = False) -> None:
        """Curves and index.html in the run folder; ``live``: after an epoch's evaluation, as
        often as keeps the report's cost small. A plotting failure never loses a run."""
        if not self.strategy.is_main:
            return
        from convnet.core import report

        try:
            (report.render_live if live else report.render)(self.out)
        except Exception as exc:  # the run itself is saved; the report can be redone
            print(
                f"convnet: warning: the report for {self.out} failed ({type(exc).__name__}: {exc}); "
                f"the run is intact, retry with: convnet report {self.out}",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ loop
    def _loop(self) -> dict[str, Any]:
        """Epochs until done, ``max_steps`` or a plugin stops the run; then the final evaluation."""
        stopped_early = False
        # A checkpoint taken on an epoch's last step (before its evaluation) leaves that epoch's
        # end pending: the loop runs it with no batches, as the straight run did.
        while self.state.epoch < self.recipe.train.epochs and (not self._max_steps_reached() or self._epoch_done()):
            self._run_epoch()
            if not self._epoch_done():  # stopped by max_steps inside the epoch
                break
            record = self._end_epoch()
            if self.hooks.convnet_should_stop(run=self.view, epoch=self.state.epoch - 1, metrics=record):
                stopped_early = True
                break
        return self._finish(stopped_early)

    def _max_steps_reached(self) -> bool:
        return bool(self.recipe.train.max_steps) and self.state.step >= self.recipe.train.max_steps

    def _epoch_done(self) -> bool:
        return self.state.batch_in_epoch >= self.parts.steps_per_epoch

    def _run_epoch(self) -> None:
        r, state = self.recipe, self.state
        self.parts.train_set.epoch = state.epoch
        batches = cdata.train_batches(
            len(self.parts.splits.train),
            r.data.batch_size,
            r.seed,
            state.epoch,
            state.batch_in_epoch,
            self.strategy.shard_batch,
        )
        if r.train.max_steps:
            batches = batches[: r.train.max_steps - state.step]
        self.parts.module.train()
        skipped: list[int] = []
        for images, labels, indices, bad in cdata.loader(
            self.parts.train_set, batches, r.data.workers, r.data.pin_memory
        ):
            skipped += bad
            cdata.check_bad_samples(
                self.parts.splits.train, bad, r.data.bad_samples, f"training set, epoch {state.epoch + 1}"
            )
            self._train_step(images, labels, indices)
            if r.train.checkpoint_every and state.step % r.train.checkpoint_every == 0:
                self.save_checkpoint()
            # One process stops at this boundary; several at the one after the step that agreed.
            self._stop = self._stop or (self._interrupt and self.strategy.world_size == 1)
            if self._stop:
                self.save_checkpoint()
                self._stop_if_interrupted()
        self._skipped_epoch = self._report_skips(
            f"epoch {state.epoch + 1}", "training", [cdata.sample_name(self.parts.splits.train, i) for i in skipped]
        )
        state.skipped_samples += self._skipped_epoch

    def _report_skips(self, when: str, split: str, names: list[str]) -> int:
        return run_folder.report_skipped(self.strategy, self.out, when, split, names)

    def _end_epoch(self) -> dict[str, Any]:
        """Evaluate, step the schedule, log, checkpoint (``best`` too when improved), tell plugins."""
        state = self.state
        results = self._evaluate(final=False)
        metric = results.get(self.recipe.train.monitor)
        if metric is None and results and not self._monitor_warned and self.strategy.is_main:
            # An evaluator that does not declare its metrics could not be checked at the start.
            self._monitor_warned = True
            print(
                f"convnet: warning: train.monitor {self.recipe.train.monitor!r} is not among this "
                f"evaluation's results ({', '.join(results)}): the schedule is told None and "
                "best.safetensors is not kept",
                file=sys.stderr,
            )
        self.parts.schedule.after_epoch(metric)
        state.epoch += 1
        state.batch_in_epoch = 0
        record = {
            "kind": "eval",
            "epoch": state.epoch - 1,
            "step": state.step,
            "lr": self.lr(),
            "skipped_samples": self._skipped_epoch,
            "skipped_eval_samples": self._eval_skipped,
            **results,
        }
        self.metrics.append(record, self._kept())
        improved = metric is not None and (state.best is None or metric < state.best)
        if improved:
            state.best = metric
        self.save_checkpoint()
        if improved:
            self.checkpoints.copy("last", "best")
        self._report(live=True)
        self.hooks.convnet_epoch_end(run=self.view, epoch=state.epoch - 1, metrics=record)
        # Ctrl-C during the evaluation: the epoch's checkpoint is the boundary.
        self._stop = self.strategy.any_rank(self._interrupt)
        self._stop_if_interrupted()
        return record

    def _finish(self, stopped_early: bool) -> dict[str, Any]:
        state = self.state
        mid_epoch = state.batch_in_epoch > 0
        if mid_epoch:  # stopped mid-epoch (train.max_steps): keep the position for a resume
            self.save_checkpoint()
        final = self._evaluate(final=True)
        metric = final.get(self.recipe.train.monitor)
        # best.safetensors is the best of the per-epoch evaluations: a mid-epoch stop's final
        # numbers go to eval.json only, or a resumed run would measure later epochs against
        # an evaluation the uninterrupted run never made.
        if not mid_epoch and metric is not None and (state.best is None or metric < state.best):
            state.best = metric
            self.save_checkpoint()
            self.checkpoints.copy("last", "best")
        self.metrics.append(
            {
                "kind": "final",
                "epoch": state.epoch,
                "step": state.step,
                "skipped_nonfinite": state.skipped_nonfinite,
                "skipped_eval_samples": self._eval_skipped,
                **final,
            },
            self._kept(),
        )
        if state.skipped_nonfinite and self.strategy.is_main:
            print(
                f"skipped {state.skipped_nonfinite} batch(es) whose loss was not finite "
                '(train.on_nonfinite = "skip-batch")',
                file=sys.stderr,
            )
        if self.strategy.is_main:
            run_folder.write_json(self.out / "eval.json", final)
        return {
            "out": str(self.out),
            "step": state.step,
            "epoch": state.epoch,
            "stopped_early": stopped_early,
            "skipped_samples": state.skipped_samples,
            "skipped_nonfinite": state.skipped_nonfinite,
            **final,
        }

    def _evaluate(self, final: bool) -> dict[str, Any]:
        """The evaluators due now. One that raises does so after the checkpoint of the steps
        trained is safe (the epoch's end stays pending, so a resume evaluates again)."""
        p = self.parts
        ctx = EvalContext(
            self.recipe,
            p.module,
            self.strategy,
            p.splits,
            p.eval_augmenters,
            self.out if self.strategy.is_main else None,
            self.state.epoch,
            final,
            self.registries,
        )
        noting = self._claim.noting_outputs() if self._claim is not None else contextlib.nullcontext()
        try:
            with noting:  # the evaluators' figures are the run's
                results = run_evaluators(p.evaluators, ctx)
        except Exception as exc:
            # A lost peer (exit_now) has taken the process group with it: saving would need it.
            if not final and not getattr(exc, "exit_now", False):
                self.save_checkpoint()
            raise
        when = "final evaluation" if final else f"epoch {self.state.epoch + 1} evaluation"
        self._eval_skipped = sum(
            self._report_skips(when, split, list(dict.fromkeys(ctx.skipped_names[split])))
            for split in sorted(ctx.skipped_names)
        )
        self.hooks.convnet_evaluation_end(run=self.view, epoch=self.state.epoch, results=results, final=final)
        self.hooks.convnet_evaluation_done(run=self.view, epoch=self.state.epoch, results=results)
        return results

    def _kept(self) -> str:
        last = self.checkpoint_path()
        return f"the last good checkpoint {last} is untouched" if last.exists() else "no checkpoint had been saved yet"

    # ------------------------------------------------------------------ step
    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        state = self.state
        # Readable samples, data shards and heard Ctrl-Cs over all processes, in one collective:
        # a process whose whole share is unreadable still takes part in the step's collectives
        # (ddp's all-reduce), and every process stops after the same step.
        count, shards, stops = self.strategy.all_reduce_sum(
            torch.tensor([len(labels), 1.0, float(self._interrupt)], dtype=torch.float64)
        ).tolist()
        self._stop = stops > 0
        if shards < self.strategy.world_size:
            # The sum spans data shards only (tower-parallel's ranks share one batch and sum
            # nothing): the stop must still be agreed by every process, or one rank saves a
            # checkpoint while the other waits in the forward's exchange.
            self._stop = self.strategy.any_rank(self._stop)
        if count:
            value = self._forward_backward(images, labels, indices, count, shards)
            self._apply_update(value)
        else:
            value = float("nan")
        state.step += 1
        state.batch_in_epoch += 1
        self.parts.schedule.after_step(state.step)
        metrics = {"epoch": state.epoch, "loss": value, "lr": self.lr()}
        if state.step % self.recipe.train.log_every == 0 or state.step == 1:
            self.metrics.append({"kind": "train", "step": state.step, **metrics}, self._kept())
        self.hooks.convnet_step_end(run=self.view, step=state.step, metrics=metrics)

    def _forward_backward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, count: float, shards: float
    ) -> float:
        """Loss and gradients of this process's share; returns the GLOBAL batch's mean loss over
        its ``count`` readable samples (every process then takes the same finite/non-finite branch).
        Dropout masks are keyed by global sample, so every strategy drops what ``single`` drops."""
        r = self.recipe
        if not len(labels):
            images = torch.zeros((0, *r.model.input))
        x = images.to(self.strategy.input_device, non_blocking=True)
        if r.data.augment_on == "device" and self.parts.train_augmenters and len(labels):
            x = augment_batch(self.parts.train_augmenters, x, r.seed, self.state.epoch, indices)
        cdata.check_input_shape(x, r.model.input, "data.dataset and data.train_augment")
        x = x.to(self.dtype)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        y = labels.to(self.strategy.input_device, non_blocking=True)
        self.parts.optimizer.zero_grad(set_to_none=True)
        with (
            torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=r.train.autocast == "bfloat16"),
            keyed.keyed_draws(r.seed, self.state.step + 1, indices),
        ):
            logits = self.parts.module(x)
        # Data shards average their gradients: scaled so that the average is the global mean.
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum") * (shards / count)
        loss.backward()
        return float(self.strategy.all_reduce_sum(loss.detach().double().reshape(1)) / shards)

    def _apply_update(self, value: float) -> None:
        """The optimizer step, unless the loss or a gradient is not finite (stop, or skip the batch)."""
        state, params = self.state, self.parts.parameters
        where = f"step {state.step + 1} (epoch {state.epoch + 1})"
        # Under tower-parallel each process holds only its tower's gradients: agree over all.
        bad_grads = self.strategy.any_rank(_has_nonfinite(p.grad for p in params.values()))
        if not math.isfinite(value) or bad_grads:
            what = f"loss is {value}" if not math.isfinite(value) else f"loss {value:.4g} has non-finite gradients"
            if self.recipe.train.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"{where}: {what}; stopped. {self._kept()}. "
                    'Lower train.optimizer.lr, or set train.on_nonfinite = "skip-batch"'
                )
            self.parts.optimizer.zero_grad(set_to_none=True)
            state.skipped_nonfinite += 1
            return
        self.parts.optimizer.step()
        # A finite loss can still take an update that overflows the weights: stop before such
        # weights reach a checkpoint (there is no undoing an in-place step).
        if self.strategy.any_rank(_has_nonfinite(params.values())):
            raise NonFiniteLossError(
                f"{where}: the update made weights non-finite (loss was {value:.4g}); "
                f"stopped. {self._kept()}. Lower train.optimizer.lr"
            )


def check_writable(out: Path, needed_bytes: int) -> None:
    """Fail before training if the run folder cannot take a checkpoint."""
    import shutil

    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / "checkpoints" / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConvnetError(f"{out}: run folder is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(out).free
    if free < needed_bytes:
        raise ConvnetError(
            f"{out}: only {free / 2**20:.1f} MiB free, a checkpoint needs about {needed_bytes / 2**20:.1f} MiB"
        )


def _has_nonfinite(tensors: Any) -> bool:
    """One host sync per device for all tensors, not one per tensor."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return not all(bool(torch.stack(f).all()) for f in flags.values())


def train(
    recipe: schema.Recipe,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    quiet: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train a recipe; return the final metrics and the run folder (what `convnet run` does)."""
    return Run(recipe, out=out, resume=resume, quiet=quiet, **kwargs).train()
