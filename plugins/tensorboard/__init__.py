"""TensorBoard event files for every run, written through the lifecycle hooks.

Active whenever the ``tensorboard`` package is installed (``pip install convnet[tensorboard]``);
without it this plugin registers no hook and says nothing, so it never counts as a failed
plugin. What it writes, into ``<run folder>/tensorboard/`` (``tensorboard --logdir runs``):

- ``train/loss`` and ``train/lr`` at every step that metrics.jsonl logs (``train.log_every``);
- ``eval/<name>`` for every scalar number of every evaluator (plugins' too) after each epoch,
  and ``final/<name>`` for the end-of-run evaluation, at the run's global step;
- ``filters/<layer>``: the first convolution's kernels as an image grid, after each evaluation.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("tensorboard") is not None:
    from convnet.plugins.tensorboard.hooks import (
        convnet_evaluation_end,
        convnet_step_end,
        convnet_train_end,
        convnet_train_start,
    )

    __all__ = ["convnet_evaluation_end", "convnet_step_end", "convnet_train_end", "convnet_train_start"]
