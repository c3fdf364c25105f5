"""Run one training from parsed flags: validate, start the processes' group, train, clean up.

Shared by `kimi-linear train` (cli/train_cmd.py) and `python -m kimi_linear.train` / torchrun
(train/__main__.py). `--plot OUT` only draws OUT/metrics.jsonl and trains nothing.
"""

from __future__ import annotations

import logging

from kimi_linear.train.args import TrainConfig
from kimi_linear.train.distributed import cleanup, env_world, init_distributed

logger = logging.getLogger(__name__)


def run_training(cfg: TrainConfig) -> dict | None:
    """Train as configured (validated first, before anything loads); return the last step's metrics record
    (None for --plot, after writing the PNG)."""
    cfg.validate(env_world()[2])
    if cfg.plot is not None:
        from kimi_linear.train.plot import plot_metrics

        plot_metrics(cfg.plot)
        return None
    info = init_distributed(cfg.device)
    try:
        from kimi_linear.train.trainer import Trainer

        return Trainer(cfg, info).run()
    finally:
        cleanup()
