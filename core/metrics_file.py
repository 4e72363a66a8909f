"""The run's ``metrics.jsonl``: one JSON record a line, appended; trimmed on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from convnet.core.errors import ConvnetError


class MetricsFile:
    """Appends records; on processes other than the main one (``enabled`` False) does nothing."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def append(self, record: dict[str, Any], on_error: str = "") -> None:
        """Write one record; a full or vanished disk is one clear error (``on_error`` says what is kept)."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise ConvnetError(f"{self.path}: cannot write metrics ({exc.strerror or exc}); {on_error}") from None

    def trim(self, step: int, epoch_end_pending: bool) -> None:
        """Forget what a killed run logged after its checkpoint at ``step``: those steps are replayed.

        A record of the checkpoint's own step stays unless it is the evaluation of an epoch end
        the checkpoint has not seen yet (``epoch_end_pending``: that evaluation runs again).
        """
        if not self.enabled or not self.path.exists():
            return
        kept = []
        # A damaged line (cut short by the kill) is dropped; bytes that are not UTF-8 are replaced
        # (a line they break is dropped too): neither stops the resume.
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                at = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if record.get("kind") == "final":
                continue
            if at < step or (at == step and not (epoch_end_pending and record.get("kind") == "eval")):
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
