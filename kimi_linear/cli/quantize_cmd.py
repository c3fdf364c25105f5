"""`kimi-linear quantize IN OUT --format {compressed-tensors,block}`: write an FP8 checkpoint from a bf16 one
(`tools.quantize.quantize_checkpoint` does the work)."""

from __future__ import annotations

import argparse

from kimi_linear.tools.quantize import FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write an FP8 checkpoint (compressed-tensors or block-wise) from a bf16 one",
                       description="Quantize the decoder's linear and expert weights of a checkpoint folder to "
                                   "float8_e4m3fn, tensor by tensor, in the compressed-tensors 'float-quantized' "
                                   "layout (per-channel or per-tensor scales) or DeepSeek/Kimi K2's block-wise one.")
    p.add_argument("in_dir", help="bf16 checkpoint folder")
    p.add_argument("out_dir", help="folder to write")
    p.add_argument("--format", default="compressed-tensors", choices=FORMATS, help="output layout")
    p.add_argument("--block-size", type=int, default=128, help="block edge of the block format (default 128)")
    p.add_argument("--strategy", default="channel", choices=("channel", "tensor"),
                   help="compressed-tensors weight scales: per output channel (default) or per tensor")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.tools.quantize import quantize_checkpoint

    n = quantize_checkpoint(args.in_dir, args.out_dir, args.format, args.block_size, args.strategy)
    print(f"wrote {args.out_dir}: {n} weights quantized to FP8 ({args.format})")
    return 0
