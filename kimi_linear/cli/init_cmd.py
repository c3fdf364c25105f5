"""`kimi-linear init --preset NAME OUT_DIR [--seed S] [--no-weights]`: write a checkpoint folder
(`tools.create.create_checkpoint` does the work)."""

from __future__ import annotations

import argparse

from kimi_linear.tools.presets import PRESETS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a Hugging Face-format checkpoint folder from a preset",
                       description="Write config.json, generation_config.json and random well-scaled weights "
                                   "(sharded safetensors, official tensor names) for a preset shape.")
    p.add_argument("out_dir", help="folder to create")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--no-weights", dest="weights", action="store_false", default=None,
                   help="write only the config files (default for the 48b presets; the engine can then "
                        "fill random weights on the device with --load-format dummy)")
    w.add_argument("--weights", dest="weights", action="store_true", help="write weights even for large presets")
    p.add_argument("--dtype", default=None, help="weight dtype (default: the preset's, bfloat16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.tools.create import create_checkpoint, default_weights

    weights = default_weights(args.preset) if args.weights is None else args.weights
    config = create_checkpoint(args.out_dir, args.preset, seed=args.seed, weights=weights, dtype=args.dtype)
    what = "config and weights" if weights else "config only (use --load-format dummy to run it)"
    print(f"wrote {args.preset} ({config.num_parameters() / 1e6:.1f}M parameters) to {args.out_dir}: {what}")
    return 0
