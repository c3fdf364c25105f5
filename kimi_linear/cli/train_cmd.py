"""`kimi-linear train ...`: pre-training and fine-tuning (full or LoRA); the flags and the work live in
`kimi_linear.train` (args.py, run.py), so `python -m kimi_linear.train` / torchrun take the same flags.
`kimi-linear train --plot OUT` draws OUT/metrics.jsonl to OUT/metrics.png."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kimi_linear.train.args import DESCRIPTION, add_train_args

    p = sub.add_parser("train", help="pre-train or fine-tune (full or LoRA); torchrun -m kimi_linear.train for "
                                     "several processes", description=DESCRIPTION)
    add_train_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.train.args import TrainConfig
    from kimi_linear.train.run import run_training

    cfg = TrainConfig.from_args(args)
    last = run_training(cfg)
    if cfg.plot is not None:
        print(f"wrote {cfg.plot}/metrics.png")
    elif last is not None:
        print(f"trained {last['step']} steps, loss {last['loss']:.4f}; outputs in {cfg.out}")
    return 0
