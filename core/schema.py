"""The recipe's attrs classes: what a recipe may say, with defaults and range checks.

Components (a dataset, an augmenter, an optimizer, ...) are tables with a registry ``name``
plus that plugin's own options; ``convnet.core.recipe`` structures their options with the
attrs class the plugin registered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, ClassVar

import attrs
from attrs import validators as v

from convnet.core import compiling

positive = v.gt(0)
non_negative = v.ge(0)


def towers_choice(instance: Any, attribute: attrs.Attribute | None, value: str) -> None:
    """A layer's ``towers``: ``"local"`` (inside each tower) or ``"cross"`` (reads every tower)."""
    if value not in ("local", "cross"):
        raise ValueError(f"expected 'local' or 'cross', found {value!r}")


def identifier(instance: Any, attribute: attrs.Attribute | None, value: str) -> None:
    """A layer id: a name made of letters, digits and ``_`` (it is a module name and a ``--set`` path piece)."""
    if not value.isidentifier():
        raise ValueError(f"expected a name made of letters, digits and _, found {value!r}")


def layer_ids(layers: Iterable[tuple[str, str | None]]) -> list[str]:
    """Each layer's id from its (registry name, stated id) pairs, in order.

    A layer without an id is named after its registry name (``-`` as ``_``) and its count
    among the layers of that name so far: the third ``relu`` is ``relu3``. The model, the
    summary, ``--set model.layers.ID`` and a child recipe's layer edits all use this rule.
    """
    counts: Counter[str] = Counter()
    ids = []
    for name, given in layers:
        counts[name] += 1
        ids.append(given or f"{name.replace('-', '_')}{counts[name]}")
    return ids


@attrs.define
class Component:
    """A registered component: its registry name and its validated options.

    ``kind`` is the registry it comes from; ``key`` the recipe key that names it.
    """

    kind: ClassVar[str] = ""
    key: ClassVar[str] = "name"
    name: str
    options: Any = None


@attrs.define
class Dataset(Component):
    kind: ClassVar[str] = "dataset"


@attrs.define
class Augmenter(Component):
    kind: ClassVar[str] = "augmenter"


@attrs.define
class Optimizer(Component):
    kind: ClassVar[str] = "optimizer"


@attrs.define
class Schedule(Component):
    kind: ClassVar[str] = "schedule"


@attrs.define
class Evaluator(Component):
    kind: ClassVar[str] = "evaluator"


@attrs.define
class Layer(Component):
    """A layer: ``towers = "local"`` keeps it inside each tower, ``"cross"`` reads all towers."""

    kind: ClassVar[str] = "layer"
    id: str | None = attrs.field(default=None, validator=v.optional(identifier))
    towers: str = attrs.field(default="local", validator=towers_choice)


@attrs.define
class Parallel(Component):
    """``strategy`` names the parallelism plugin; the other keys are its options."""

    kind: ClassVar[str] = "strategy"
    key: ClassVar[str] = "strategy"


def _input_shape(instance: Any, attribute: attrs.Attribute, value: list[int]) -> None:
    if len(value) != 3 or any(d <= 0 for d in value):
        raise ValueError(f"expected [channels, height, width], all > 0, found {value!r}")


@attrs.define
class Model:
    input: list[int] = attrs.field(validator=_input_shape)
    num_classes: int = attrs.field(validator=positive)
    layers: list[Layer] = attrs.field(validator=v.min_len(1))
    towers: int = attrs.field(default=1, validator=[positive, v.le(64)])
    dtype: str = attrs.field(default="float32", validator=v.in_(("float32", "float64")))


@attrs.define
class Data:
    dataset: Dataset
    batch_size: int = attrs.field(default=128, validator=positive)
    eval_batch_size: int | None = attrs.field(default=None, validator=v.optional(positive))
    workers: int = attrs.field(default=0, validator=[non_negative, v.le(256)])
    train_augment: list[Augmenter] = attrs.Factory(list)
    eval_augment: list[Augmenter] = attrs.Factory(list)
    augment_on: str = attrs.field(default="worker", validator=v.in_(("worker", "device")))
    pin_memory: bool = False
    bad_samples: str = attrs.field(default="skip", validator=v.in_(("skip", "fatal")))


def _default_optimizer() -> Optimizer:
    return Optimizer("paper-sgd")


def _default_schedule() -> Schedule:
    return Schedule("constant")


@attrs.define
class Train:
    epochs: int = attrs.field(default=1, validator=[positive, v.le(1_000_000)])
    max_steps: int | None = attrs.field(default=None, validator=v.optional(positive))
    optimizer: Optimizer = attrs.Factory(_default_optimizer)
    schedule: Schedule = attrs.Factory(_default_schedule)
    monitor: str = "top1_error"
    on_nonfinite: str = attrs.field(default="stop", validator=v.in_(("stop", "skip-batch")))
    checkpoint_every: int = attrs.field(default=0, validator=non_negative)
    deterministic: bool = True
    log_every: int = attrs.field(default=10, validator=positive)
    # The fast training path (README.md, "Fast training path"): each is a measured option, off by default.
    channels_last: bool = False
    autocast: str = attrs.field(default="none", validator=v.in_(("none", "bfloat16")))
    cudnn_benchmark: bool = False
    # Large CPU tensors from the heap, freed memory kept for the next step (core/cpu_memory.py; glibc).
    reuse_cpu_memory: bool = False
    # torch.compile the module (core/compiling.py): same losses within float32 rounding, same checkpoints.
    compile: bool = False
    compile_mode: str = attrs.field(default="default", validator=v.in_(compiling.MODES))


def _default_parallel() -> Parallel:
    return Parallel("single")


def _default_evaluate() -> list[Evaluator]:
    return [Evaluator("topk")]


@attrs.define
class Plugins:
    """``disable``: plugins (by entry-point name) whose lifecycle hooks this run does not call;
    only plugins that register no component can be disabled."""

    disable: list[str] = attrs.Factory(list)


@attrs.define
class Recipe:
    model: Model
    data: Data
    name: str = ""
    description: str = ""
    seed: int = attrs.field(default=0, validator=[non_negative, v.lt(2**63)])
    train: Train = attrs.Factory(Train)
    parallel: Parallel = attrs.Factory(_default_parallel)
    evaluate: list[Evaluator] = attrs.Factory(_default_evaluate)
    plugins: Plugins = attrs.Factory(Plugins)
