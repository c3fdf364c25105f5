"""`python -m kimi_linear.train ...` and `torchrun --nproc-per-node N -m kimi_linear.train ...`: the flags of
`kimi-linear train` (train/args.py). An unknown flag prints this usage and the flag; a bad option, bad
data or a missing file prints `error: ...` naming it and exits with 2 (on every rank), without a traceback."""

from __future__ import annotations

import argparse
import sys

from kimi_linear.errors import KimiLinearError
from kimi_linear.train.args import DESCRIPTION, TrainConfig, add_train_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimi_linear.train", description=DESCRIPTION)
    add_train_args(parser)
    cfg = TrainConfig.from_args(parser.parse_args(argv))
    from kimi_linear.train.run import run_training

    try:
        run_training(cfg)
    except KimiLinearError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if cfg.plot is not None:
        print(f"wrote {cfg.plot}/metrics.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
