"""Where a run stands: the counters a checkpoint saves and a resume restores."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class TrainState:
    """The run's position and counters (optimizer, schedule and RNG state live beside it).

    ``batch_in_epoch == steps_per_epoch`` means the epoch's steps are done but its end
    (evaluation, schedule, checkpoint) is not: a resume runs that end first.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float | None = None
    skipped_samples: int = 0
    skipped_nonfinite: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> TrainState:
        """Read a checkpoint's ``convnet.state`` (checkpoints before 0.2 say ``skipped``)."""
        return cls(
            step=int(state["step"]),
            epoch=int(state["epoch"]),
            batch_in_epoch=int(state["batch_in_epoch"]),
            best=None if state.get("best") is None else float(state["best"]),
            skipped_samples=int(state.get("skipped_samples", state.get("skipped", 0))),
            skipped_nonfinite=int(state.get("skipped_nonfinite", 0)),
        )
