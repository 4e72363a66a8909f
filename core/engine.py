"""The train loop: epochs of steps, evaluation, schedule, checkpoints, metrics, hooks."""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import nn

from convnet.core import checkpoint as ckpt
from convnet.core import data as cdata
from convnet.core import plugins, schema
from convnet.core.errors import CheckpointError, ConvnetError, NonFiniteLossError, RecipeError
from convnet.core.evaluation import EvalContext, Evaluator, run_evaluators
from convnet.core.model import Network, build_model
from convnet.core.recipe import to_toml
from convnet.core.registry import Registries
from convnet.core.strategy import Strategy


class Interrupted(ConvnetError):
    """Ctrl-C: a checkpoint was saved at a step boundary; exit code 130."""

    exit_code = 130


def build_strategy(recipe: schema.Recipe, registries: Registries) -> Strategy:
    entry = registries.strategy.get(recipe.parallel.name, "parallel.strategy")
    try:
        return entry.factory(recipe.parallel.options, recipe)
    except ValueError as exc:
        raise RecipeError(f"parallel: {exc}") from None


def default_out(recipe: schema.Recipe) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / (recipe.name or "recipe") / stamp


def check_writable(out: Path, needed_bytes: int) -> None:
    """Fail before training if the run folder cannot take a checkpoint."""
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / "checkpoints" / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConvnetError(f"{out}: run folder is not writable: {exc.strerror or exc}") from None
    free = shutil.disk_usage(out).free
    if free < needed_bytes:
        raise ConvnetError(f"{out}: only {free / 2**20:.1f} MiB free, a checkpoint needs about "
                           f"{needed_bytes / 2**20:.1f} MiB")


def checkpoint_room(recipe: schema.Recipe, registries: Registries) -> int:
    """Bytes the run folder needs: an atomic save holds the old and the new checkpoint at once,
    each with the weights and up to two optimizer buffers per weight (sized on the meta device)."""
    model = build_model(recipe, "meta", registries)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * 3 * weights + (1 << 20)


class Run:
    """One training run; the object lifecycle hooks receive."""

    def __init__(self, recipe: schema.Recipe, out: str | Path | None = None, resume: str | Path | None = None,
                 quiet: bool = False, registries: Registries | None = None,
                 pm: pluggy.PluginManager | None = None, recipe_ref: str | None = None,
                 overrides: tuple[str, ...] = ()) -> None:
        self.recipe = recipe
        self.registries = registries or plugins.registries()
        self.pm = pm or plugins.manager()
        self.quiet = quiet
        self.recipe_ref = recipe_ref or recipe.name
        self.overrides = overrides
        self.strategy = build_strategy(recipe, self.registries)
        self.out = Path(out) if out is not None else default_out(recipe)
        self.resume_from = Path(resume) if resume is not None else None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: float | None = None
        self.skipped = 0
        self.skipped_nonfinite = 0
        self.total_steps = 0
        self._interrupt = False
        self.last_eval: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        r = self.recipe
        if r.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # cudnn.benchmark picks kernels by timing them, so it is only honoured when not deterministic.
        torch.backends.cudnn.benchmark = r.train.cudnn_benchmark and not r.train.deterministic
        torch.manual_seed(r.seed)
        if self.strategy.is_main:  # before anything is allocated or read: a full disk costs nothing
            check_writable(self.out, needed_bytes=checkpoint_room(r, self.registries))
        model = build_model(r, "cpu", self.registries)
        self.network: Network = model
        self.splits = cdata.build_dataset(r, self.registries)
        self.module: nn.Module = self.strategy.prepare(model)
        self.dtype = next(iter(self.module.parameters())).dtype
        self.memory_format = torch.channels_last if r.train.channels_last else torch.contiguous_format
        if r.train.channels_last:
            self.module.to(memory_format=torch.channels_last)
        named = list(self.strategy.named_parameters(self.module))
        self.named_params = dict(named)
        opt = self.registries.optimizer.get(r.train.optimizer.name, "train.optimizer.name")
        self.optimizer: torch.optim.Optimizer = opt.factory(r.train.optimizer.options, named)
        sch = self.registries.schedule.get(r.train.schedule.name, "train.schedule.name")
        self.schedule = sch.factory(r.train.schedule.options, self.optimizer)
        self.train_aug = cdata.build_augmenters(r.data.train_augment, self.registries, "data.train_augment", r)
        self.eval_aug = cdata.build_augmenters(r.data.eval_augment, self.registries, "data.eval_augment", r)
        self.evaluators: list[tuple[str, Evaluator]] = []
        for i, comp in enumerate(r.evaluate):
            entry = self.registries.evaluator.get(comp.name, f"evaluate[{i}].name")
            self.evaluators.append((comp.name, entry.factory(comp.options, r)))
        self.train_set = cdata.Augmented(self.splits.train, [] if r.data.augment_on == "device" else self.train_aug,
                                         r.seed, cdata.STREAM_TRAIN_AUGMENT)
        self.steps_per_epoch = cdata.steps_per_epoch(len(self.splits.train), r.data.batch_size)
        if self.steps_per_epoch == 0:
            raise RecipeError(f"data.batch_size = {r.data.batch_size} is larger than the training set "
                              f"({len(self.splits.train)} samples)")
        self.total_steps = self.steps_per_epoch * r.train.epochs
        if r.train.max_steps:
            self.total_steps = min(self.total_steps, r.train.max_steps)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if self.strategy.is_main:
            (self.out / "recipe.toml").write_text(to_toml(r, self.registries), encoding="utf-8")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, which: str = "last") -> Path:
        return self.out / "checkpoints" / f"{which}.safetensors"

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self.named_params.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value
        names = {id(p): n for n, p in self.named_params.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
                  for g in self.optimizer.param_groups]
        return tensors, groups

    def save_checkpoint(self, which: str = "last") -> Path:
        opt_tensors, groups = self._optimizer_state()
        model_state = self.strategy.state_dict(self.module)
        opt_tensors = self.strategy.gather_tensors(opt_tensors)
        path = self.checkpoint_path(which)
        if not self.strategy.is_main:
            return path
        rng, rng_meta = ckpt.capture_rng()
        tensors = {f"model/{k}": v for k, v in model_state.items()}
        tensors.update({f"optimizer/{k}": v for k, v in opt_tensors.items()})
        tensors.update(rng)
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "best": self.best, "optimizer_groups": groups, "schedule": self.schedule.state_dict(),
                 "rng": rng_meta, "skipped": self.skipped, "skipped_nonfinite": self.skipped_nonfinite}
        ckpt.save(path, tensors, {"convnet.recipe": to_toml(self.recipe, self.registries),
                                  "convnet.state": json.dumps(state)})
        return path

    def _resume(self, path: Path) -> None:
        tensors, metadata = ckpt.load(path)
        state = ckpt.state_of(metadata, path)
        model_state = ckpt.model_tensors(tensors)
        expected = self.network.state_dict()
        ckpt.check_compatible(path, expected, model_state)
        self._check_same_run(path, metadata.get("convnet.recipe", ""))
        self.strategy.load_state_dict(self.module, model_state)
        opt = {k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        opt = self.strategy.scatter_tensors(opt)
        for key, value in opt.items():
            name, _, buf = key.rpartition("/")
            p = self.named_params.get(name)
            if p is not None:
                self.optimizer.state[p][buf] = value.to(device=p.device, dtype=value.dtype)
        for group, saved in zip(self.optimizer.param_groups, state["optimizer_groups"]):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch, self.best = int(state["batch_in_epoch"]), state["best"]
        self.skipped = int(state.get("skipped", 0))
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        try:
            ckpt.restore_rng(tensors, state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: RNG state is missing or corrupt ({exc})") from None
        if self.strategy.is_main:
            self._trim_metrics()

    def _trim_metrics(self) -> None:
        """Forget what a killed run logged after its checkpoint: those steps are replayed.

        A record of the checkpoint's own step stays unless it belongs to an epoch end the
        checkpoint has not seen yet (that evaluation runs again).
        """
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        epoch_end_pending = self.batch_in_epoch >= self.steps_per_epoch
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
            if record.get("kind") == "final":
                continue
            if step < self.step or (step == self.step and not (epoch_end_pending and record.get("kind") == "eval")):
                kept.append(line)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    def _check_same_run(self, path: Path, saved_text: str) -> None:
        """Refuse a checkpoint whose recipe trains differently: the run would not continue."""
        try:
            saved = tomllib.loads(saved_text)
        except tomllib.TOMLDecodeError:
            raise CheckpointError(f"{path}: the recipe stored in the checkpoint is not valid TOML") from None
        diff = _first_difference(saved, tomllib.loads(to_toml(self.recipe, self.registries)), "")
        if diff is not None:
            key, old, new = diff
            raise CheckpointError(
                f"{path}: saved by a run whose recipe differs at {key} (checkpoint: {old!r}, now: {new!r}); "
                "resuming would not continue that run. Use the same recipe and --set values "
                "(epochs, max_steps, strategy, workers and evaluators may change)")

    # ------------------------------------------------------------------ metrics
    def log(self, record: dict[str, Any]) -> None:
        if not self.strategy.is_main:
            return
        path = self.out / "metrics.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full or vanished disk: say so, the last checkpoint is whole
            raise ConvnetError(f"{path}: cannot write metrics ({exc.strerror or exc}); {self._kept()}") from None

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ loop
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupt:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._interrupt = True

    def resume_command(self) -> str:
        sets = " ".join(f"--set {shlex.quote(s)}" for s in self.overrides)
        ckp = self.checkpoint_path("last")
        return (f"convnet run {shlex.quote(self.recipe_ref)} {sets + ' ' if sets else ''}"
                f"--out {shlex.quote(str(self.out))} --resume {shlex.quote(str(ckp))}")

    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        except RuntimeError as exc:  # a lost peer under a multi-process strategy: one clear line
            error = self.strategy.translate_error(exc)
            if error is None:
                raise
            raise error from exc

    def _train(self) -> dict[str, Any]:
        self._setup()
        old_handler = None
        if self.strategy.is_main and _in_main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self.pm.hook.convnet_train_start(run=self)
        try:
            summary = self._loop()
        except BaseException as exc:  # observers (progress bars) still hear that the run ended
            self.pm.hook.convnet_train_end(run=self, summary={"out": str(self.out), "step": self.step,
                                                              "error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if self.strategy.is_main:
            self._report()
        self.pm.hook.convnet_train_end(run=self, summary=summary)
        self.strategy.close()
        return summary

    def _report(self, live: bool = False) -> None:
        """Curves and index.html in the run folder; a plotting failure never loses a run.
        ``live``: after an epoch's evaluation, as often as keeps the report's cost small."""
        from convnet.core import report

        try:
            (report.render_live if live else report.render)(self.out)
        except Exception as exc:  # the run itself is saved; the report can be redone
            print(f"convnet: warning: the report for {self.out} failed ({type(exc).__name__}: {exc}); "
                  f"the run is intact, retry with: convnet report {self.out}", file=sys.stderr)

    def _evaluate(self, final: bool) -> dict[str, Any]:
        ctx = EvalContext(self.recipe, self.module, self.strategy, self.splits, self.eval_aug,
                          self.out if self.strategy.is_main else None, self.epoch, final)
        results = run_evaluators(self.evaluators, ctx)
        self.pm.hook.convnet_evaluation_done(run=self, epoch=self.epoch, results=results)
        return results

    def _loop(self) -> dict[str, Any]:
        r = self.recipe
        monitor = r.train.monitor
        max_steps = r.train.max_steps
        stopped_early = False
        # A checkpoint taken on an epoch's last step (before its evaluation) leaves that epoch's
        # end pending: the loop runs it with no batches, as the straight run did.
        while self.epoch < r.train.epochs and (not max_steps or self.step < max_steps
                                               or self.batch_in_epoch >= self.steps_per_epoch):
            self.train_set.epoch = self.epoch
            batches = cdata.train_batches(len(self.splits.train), r.data.batch_size, r.seed, self.epoch,
                                          self.batch_in_epoch, self.strategy.shard_batch)
            if max_steps:
                batches = batches[: max_steps - self.step]
            self.module.train()
            skipped_epoch = 0
            for images, labels, indices, bad in cdata.loader(self.train_set, batches, r.data.workers,
                                                             r.data.pin_memory):
                skipped_epoch += bad
                cdata.check_bad_samples(bad, r.data.bad_samples, f"training set, epoch {self.epoch + 1}")
                self._train_step(images, labels, indices)
                if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0:
                    self.save_checkpoint("last")
                if self._interrupt:
                    path = self.save_checkpoint("last")
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint saved to {path}\n"
                                      f"resume with: {self.resume_command()}")
            self.skipped += skipped_epoch
            epoch_done = self.batch_in_epoch >= self.steps_per_epoch
            if not epoch_done:  # stopped by max_steps inside the epoch
                break
            results = self._evaluate(final=False)
            metric = results.get(monitor)
            self.schedule.step_epoch(metric)
            self.epoch += 1
            self.batch_in_epoch = 0
            record = {"kind": "eval", "epoch": self.epoch - 1, "step": self.step, "lr": self.lr(),
                      "skipped_samples": skipped_epoch, **results}
            self.log(record)
            self.last_eval = results
            if skipped_epoch and self.strategy.is_main:
                print(f"epoch {self.epoch}: skipped {skipped_epoch} unreadable training sample(s)",
                      file=sys.stderr)
            improved = metric is not None and (self.best is None or metric < self.best)
            if improved:
                self.best = metric
            self.save_checkpoint("last")
            if improved and self.strategy.is_main:
                ckpt.copy(self.checkpoint_path("last"), self.checkpoint_path("best"))
            if self.strategy.is_main:
                self._report(live=True)
            self.pm.hook.convnet_epoch_end(run=self, epoch=self.epoch - 1, metrics=record)
            if self._interrupt:  # Ctrl-C during the evaluation: the epoch's checkpoint is the boundary
                raise Interrupted(f"interrupted at step {self.step}; checkpoint saved to {self.checkpoint_path('last')}\n"
                                  f"resume with: {self.resume_command()}")
            if self.pm.hook.convnet_should_stop(run=self, epoch=self.epoch - 1, metrics=record):
                stopped_early = True
                break
        if self.batch_in_epoch:  # stopped mid-epoch: keep the position for a resume
            self.save_checkpoint("last")
        final = self._evaluate(final=True)
        self.last_eval = final
        self.log({"kind": "final", "epoch": self.epoch, "step": self.step,
                  "skipped_nonfinite": self.skipped_nonfinite, **final})
        if self.skipped_nonfinite and self.strategy.is_main:
            print(f"skipped {self.skipped_nonfinite} batch(es) whose loss was not finite "
                  "(train.on_nonfinite = \"skip-batch\")", file=sys.stderr)
        if self.strategy.is_main:
            (self.out / "eval.json").write_text(json.dumps(final, indent=2) + "\n", encoding="utf-8")
        return {"out": str(self.out), "step": self.step, "epoch": self.epoch, "stopped_early": stopped_early,
                "skipped_samples": self.skipped, "skipped_nonfinite": self.skipped_nonfinite, **final}

    def _kept(self) -> str:
        last = self.checkpoint_path("last")
        return f"the last good checkpoint {last} is untouched" if last.exists() else "no checkpoint had been saved yet"

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        r = self.recipe
        next_step = self.step + 1
        if len(labels):
            x = images.to(self.strategy.input_device, non_blocking=True)
            if r.data.augment_on == "device" and self.train_aug:
                x = _device_augment(self.train_aug, x, r.seed, self.epoch, indices)
            x = x.to(self.dtype)
            if x.dim() == 4:
                x = x.contiguous(memory_format=self.memory_format)
            y = labels.to(self.strategy.input_device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=r.train.autocast == "bfloat16"):
                logits = self.module(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            loss.backward()
            # The mean over the GLOBAL batch when processes hold shards of it (ddp); every
            # process then takes the same finite/non-finite branch below.
            total = self.strategy.all_reduce_sum(
                torch.tensor([float(loss.detach()) * len(labels), len(labels)], dtype=torch.float64))
            value = float(total[0] / total[1])
            # Under tower-parallel each process holds only its tower's gradients: agree over all.
            bad_grads = self.strategy.any_rank(_has_nonfinite(p.grad for p in self.named_params.values()))
            if not math.isfinite(value) or bad_grads:
                what = f"loss is {value}" if not math.isfinite(value) else f"loss {value:.4g} has non-finite gradients"
                if r.train.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"step {next_step} (epoch {self.epoch + 1}): {what}; stopped. {self._kept()}. "
                        "Lower train.optimizer.lr, or set train.on_nonfinite = \"skip-batch\"")
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_nonfinite += 1
            else:
                self.optimizer.step()
                # A finite loss can still take an update that overflows the weights: stop before
                # such weights reach a checkpoint (there is no undoing an in-place step).
                if self.strategy.any_rank(_has_nonfinite(self.named_params.values())):
                    raise NonFiniteLossError(
                        f"step {next_step} (epoch {self.epoch + 1}): the update made weights non-finite "
                        f"(loss was {value:.4g}); stopped. {self._kept()}. Lower train.optimizer.lr")
        else:
            value = float("nan")
        self.step = next_step
        self.batch_in_epoch += 1
        metrics = {"epoch": self.epoch, "loss": value, "lr": self.lr()}
        if self.step % r.train.log_every == 0 or self.step == 1:
            self.log({"kind": "train", "step": self.step, **metrics})
        self.pm.hook.convnet_step_end(run=self, step=self.step, metrics=metrics)


# What a resume may change without changing the run's result.
RESUME_MAY_CHANGE = {"name", "description", "train.epochs", "train.max_steps", "train.checkpoint_every",
                     "train.log_every", "parallel", "evaluate", "data.workers", "data.eval_batch_size",
                     "data.pin_memory", "data.augment_on"}


def _first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    if path in RESUME_MAY_CHANGE:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=lambda k: (k not in old, k)):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else (path or "(top level)", old, new)


def _has_nonfinite(tensors: Any) -> bool:
    """One host sync per device for all tensors, not one per tensor."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t is not None:
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return not all(bool(torch.stack(f).all()) for f in flags.values())


def _device_augment(augmenters: list, x: torch.Tensor, seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """Batched augmentation after transfer: one call per augmenter per batch.

    Stage i of the chain gets the per-sample keys the worker placement seeds sample i's
    generator with (same stream), so key-driven augmenters crop/flip/light each sample the
    same way in either placement.
    """
    for stage, aug in enumerate(augmenters):
        batch = getattr(aug, "batch", None)
        if batch is None:
            raise RecipeError(f"data.train_augment[{stage}]: data.augment_on = \"device\", but augmenter "
                              f"{type(aug).__name__} has no batched form")
        keys = torch.from_numpy(cdata.sample_keys(seed, cdata.STREAM_TRAIN_AUGMENT, epoch, indices, stage)
                                .astype("int64"))
        x = batch(x, keys)
    return x


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(recipe: schema.Recipe, out: str | Path | None = None, resume: str | Path | None = None,
          quiet: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Train a recipe; return the final metrics and the run folder (what `convnet run` does)."""
    return Run(recipe, out=out, resume=resume, quiet=quiet, **kwargs).train()
