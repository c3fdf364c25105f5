"""Engine flags shared by `serve`, `generate`, `chat` (offline) and `bench latency|throughput`, with
vLLM's names; and the embedded default model used when no MODEL_DIR is given."""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "tiny"


def parse_size(value: str) -> int:
    """An integer with an optional k/K (x1000) or m/M suffix, as vLLM accepts ("32K", "1m")."""
    v = value.strip()
    mult = 1
    if v and v[-1] in "kK":
        mult, v = 1000, v[:-1]
    elif v and v[-1] in "mM":
        mult, v = 1000 ** 2, v[:-1]
    try:
        n = int(float(v) * mult) if "." in v else int(v) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return n


def add_engine_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    g = p.add_argument_group("model and engine")
    if model_optional:
        g.add_argument("model", nargs="?", default=None,
                       help="checkpoint folder (default: a built-in tiny demo model, created on first use)")
    else:
        g.add_argument("model", help="checkpoint folder")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    g.add_argument("--max-model-len", type=parse_size, default=None, help="context length (accepts 32K, 1M)")
    g.add_argument("--max-num-seqs", type=parse_size, default=256, help="maximum running requests")
    g.add_argument("--max-num-batched-tokens", type=parse_size, default=8192, help="token budget per step")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory to use")
    g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="auto = read the weights; dummy = random weights from config.json (benchmarks)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=int, default=64, help="tokens per MLA latent-cache block")


def resolve_model(model: str | None) -> str:
    """The given folder, or the embedded default: a tiny checkpoint written once to the cache dir."""
    if model is not None:
        return model
    from kimi_linear.tools.create import create_checkpoint

    cache = os.environ.get("KIMI_LINEAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kimi_linear")
    path = os.path.join(cache, f"default-{DEFAULT_PRESET}")
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        logger.info("no model given: writing the built-in %s demo model to %s", DEFAULT_PRESET, path)
        tmp = path + f".tmp{os.getpid()}"
        create_checkpoint(tmp, DEFAULT_PRESET, seed=0, progress=False)
        os.makedirs(cache, exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; use its folder
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=resolve_model(args.model), device=args.device,
                dtype=None if args.dtype == "auto" else args.dtype, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                seed=args.seed, load_format=args.load_format, block_size=args.block_size)
