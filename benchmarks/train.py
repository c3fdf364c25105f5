"""Training throughput: ours vs transformers==5.23.0 (+ fla-core 0.6.0 kernels) on the same config and batch.

Rows (each a model shape and a sequence length):
  1b-4k, 1b-32k    a hybrid of ~1B non-embedding parameters: 16 layers (12 KDA + 4 MLA, MLA last), hidden 2048,
                   64 routed experts (k = 8, width 128) + 1 shared, the first layer dense, the real vocabulary
  48b-4l-4k, 48b-4l-32k   the 48B-A3B shape (256 experts, hidden 2304) with 4 layers (3 KDA + 1 MLA): per-layer cost
Each implementation trains the same thing: fp32 master weights, bf16 autocast, one row of seq_len tokens per
step (one document, labels = the next tokens), loss = mean token cross-entropy, backward, grad-norm clip 1.0,
torch AdamW (fused on CUDA, foreach on the CPU; the same optimizer object and settings for both), zero_grad. Ours runs `model(ids, cu_seqlens=, labels=)` (chunked linear + CE, the
Triton KDA training kernels); the peer is transformers' KimiLinearForCausalLM built from the same config.json
(transformers uses fla's chunk_kda / fused ops when `fla` is importable, which the table reports).

Per row and implementation: median step time over --steps timed steps after --warmup steps, tokens/s, MFU
(FLOPs per token from the config, `train/metrics.py`: active parameters incl. attention, x3 for backward;
the bf16 dense peak of the device), and peak allocated memory over the timed steps (weights, gradients and
optimizer state included). A failure (OOM, a missing kernel, `--timeout-per-impl` seconds passed) is caught
per row and implementation and printed with its reason; the table then shows ours beside the peer as ratios
(tokens/s ours / peer, memory ours / peer). Each row prints as it finishes and `--out` is rewritten after
every row, so a run cut short keeps the rows done.

    python -m benchmarks.train [--rows 1b-4k,1b-32k] [--steps 5] [--warmup 2] [--grad-checkpointing] [--out r.json]
                               [--timeout-per-impl 120] [--profile K]
    a row NAME:gc runs both implementations with per-layer activation checkpointing; NAME:gcN checkpoints every
    Nth layer in ours (selective, `--grad-checkpointing-every N`) and every layer in the peer (transformers
    checkpoints all layers or none): ours at its memory / speed setting beside the peer's only one that fits
    python -m benchmarks.train --smoke      # tiny shapes on the CPU (CI): both implementations, 2 steps
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import signal
import statistics
import tempfile
import time
import traceback

import torch

from benchmarks.common import import_fla, log
from kimi_linear.config import ModelConfig
from kimi_linear.tools.presets import preset_config
from kimi_linear.train.metrics import flops_per_token, peak_flops


# ---------------------------------------------------------------- shapes
def _hybrid(num_layers: int) -> dict:
    full = list(range(4, num_layers + 1, 4))
    if num_layers not in full:
        full.append(num_layers)
    return {"kda_layers": [i for i in range(1, num_layers + 1) if i not in full], "full_attn_layers": full}


def hybrid_1b() -> dict:
    d = preset_config("48b-a3b")
    d.pop("auto_map", None)
    d.update(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
             intermediate_size=8192, num_experts=64, num_experts_per_token=8, moe_intermediate_size=128,
             linear_attn_config={**_hybrid(16), "num_heads": 16, "head_dim": 128, "short_conv_kernel_size": 4})
    return d


def shape_48b(num_layers: int = 4) -> dict:
    d = preset_config("48b-a3b")
    d.pop("auto_map", None)
    d.update(num_hidden_layers=num_layers, linear_attn_config={**d["linear_attn_config"], **_hybrid(num_layers)})
    return d


def tiny() -> dict:
    return preset_config("tiny")


ROWS = {
    "1b-4k": (hybrid_1b, 4096),
    "1b-32k": (hybrid_1b, 32768),
    "48b-4l-4k": (shape_48b, 4096),
    "48b-4l-32k": (shape_48b, 32768),
}
SMOKE_ROWS = {"tiny-64": (tiny, 64)}
GC_SUFFIX = ":gc"  # NAME:gc: both checkpoint every layer; NAME:gcN: ours every Nth layer, the peer every layer


def split_row(name: str) -> tuple[str, int]:
    """(base row, ours' checkpointing stride: 0 off, 1 every layer, N every Nth layer) of a row name."""
    base, sep, tail = name.partition(GC_SUFFIX)
    if not sep:
        return name, 0
    if tail == "":
        return base, 1
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"row {name!r}: the suffix is {GC_SUFFIX} or {GC_SUFFIX}N with N >= 1")
    return base, int(tail)


# ---------------------------------------------------------------- the two implementations
def build_ours(cfg_dict: dict, device: torch.device, grad_checkpointing: int):
    from kimi_linear.models import KimiLinearForCausalLM
    from kimi_linear.models.init import init_weights

    model = KimiLinearForCausalLM.from_config(ModelConfig.from_dict(cfg_dict), device=device, dtype=torch.float32)
    init_weights(model, seed=0)
    model.train()
    if grad_checkpointing:
        model.gradient_checkpointing_enable(every=grad_checkpointing)

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        cu = torch.tensor([0, L], dtype=torch.int32, device=ids.device)
        out = model(ids, cu_seqlens=cu, labels=labels)
        return out.loss_sum / out.num_tokens.clamp_min(1)

    return model, loss_fn


def build_peer(cfg_dict: dict, device: torch.device, grad_checkpointing: int):
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_dict, f)
        config = transformers.AutoConfig.from_pretrained(tmp)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss  # transformers shifts the labels itself

    return model, loss_fn


IMPLS = {"ours": build_ours, "peer": build_peer}


# ---------------------------------------------------------------- one measurement
def measure(impl: str, cfg_dict: dict, seq_len: int, device: torch.device, steps: int, warmup: int,
            grad_checkpointing: int, profile: int = 0) -> dict:
    """`grad_checkpointing`: 0 off, N >= 1 every Nth layer (the peer takes any N >= 1 as every layer)."""
    model, loss_fn = IMPLS[impl](copy.deepcopy(cfg_dict), device, grad_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"  # one multi-tensor kernel per step on the GPU; identical for both sides
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused, foreach=not fused)
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = cfg_dict["vocab_size"]
    use_bf16 = device.type == "cuda"
    times, losses = [], []

    def step() -> float:
        ids = torch.randint(0, vocab - 256, (1, seq_len), generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # syncs

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    if profile:
        print_profile(step, impl, seq_len, profile)
    sec = statistics.median(times)
    tps = seq_len / sec
    config = ModelConfig.from_dict(cfg_dict)
    peak = peak_flops(device)
    result = {"step_s": sec, "tokens_per_s": tps, "loss": losses[-1],
              "mfu": tps * flops_per_token(config, seq_len) / peak if peak else None,
              "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
    del model, opt, params
    return result


def print_profile(step, impl: str, seq_len: int, top: int) -> None:
    """One more step under torch.profiler: the `top` kernels by total device time, and the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    log(f"profile {impl} seq {seq_len}: device time {total / 1e3:.1f} ms in {sum(e.count for e in events)} kernels")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        log(f"  {e.self_device_time_total / 1e3:8.2f} ms {100 * e.self_device_time_total / max(total, 1):5.1f}% "
            f"x{e.count:<5} {e.key[:110]}")


class ImplTimeout(Exception):
    """One implementation's measurement ran past --timeout-per-impl."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ImplTimeout in the main thread after `seconds` (0 = no limit; SIGALRM, so POSIX main thread only).
    A CUDA kernel already launched runs on; the next Python bytecode raises."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise ImplTimeout(f"timed out after {seconds:g} s (--timeout-per-impl)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_PEER_RESULTS: dict[tuple[str, bool], dict] = {}  # (base row, checkpointed): the peer runs each once per call


def run_row(name: str, cfg_dict: dict, seq_len: int, device: torch.device, args) -> dict:
    config = ModelConfig.from_dict(cfg_dict)
    base, every = split_row(name)
    every = every or int(args.grad_checkpointing)
    stride = {"ours": every, "peer": int(every > 0)}
    row = {"row": name, "seq_len": seq_len, "params_b": config.num_parameters() / 1e9,
           "flops_per_token": flops_per_token(config, seq_len), "grad_checkpointing": every > 0,
           "checkpoint_every": stride}
    for impl in ("ours", "peer"):
        if impl not in args.impls:
            row[impl] = {"error": "not run (--impls)"}
            continue
        if impl == "peer" and (base, stride["peer"] > 0) in _PEER_RESULTS:
            row[impl] = _PEER_RESULTS[(base, stride["peer"] > 0)]
            log(f"{name}: peer: the same configuration measured above, reused")
            continue
        log(f"{name}: {impl} ...")
        t0 = time.perf_counter()
        try:
            with time_limit(args.timeout_per_impl):
                row[impl] = measure(impl, cfg_dict, seq_len, device, args.steps, args.warmup, stride[impl], args.profile)
        except ImplTimeout as e:
            row[impl] = {"error": str(e)}
        except torch.cuda.OutOfMemoryError as e:
            row[impl] = {"error": f"OOM: {str(e).splitlines()[0]}"}
        except Exception as e:  # a missing kernel, a peer incompatibility: report it and go on
            row[impl] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            if args.verbose:
                traceback.print_exc()
        log(f"{name}: {impl}: {row[impl]} ({time.perf_counter() - t0:.0f} s)")
        if impl == "peer":
            _PEER_RESULTS[(base, stride["peer"] > 0)] = row[impl]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours, peer = row["ours"], row["peer"]
    if "error" not in ours and "error" not in peer:
        row["speedup"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        if ours["peak_memory_gb"] and peer["peak_memory_gb"]:
            row["memory_ratio"] = ours["peak_memory_gb"] / peer["peak_memory_gb"]
    return row


# ---------------------------------------------------------------- report
def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'row':<14} {'seq':>6} {'params':>7} | {'ours tok/s':>10} {'MFU':>6} {'mem GB':>7} | "
            f"{'peer tok/s':>10} {'MFU':>6} {'mem GB':>7} | {'speedup':>7} {'mem':>5}")
    lines = [head, "-" * len(head)]
    errors = []
    for r in rows:
        cells = []
        for impl in ("ours", "peer"):
            m = r[impl]
            if "error" in m:
                cells.append(f"{'failed':>10} {'-':>6} {'-':>7}")
                errors.append(f"{r['row']} {impl}: {m['error']}")
            else:
                mfu = None if m["mfu"] is None else 100 * m["mfu"]
                cells.append(f"{m['tokens_per_s']:>10.0f} {_fmt(mfu, '5.1f') + '%' if mfu is not None else '-':>6} "
                             f"{_fmt(m['peak_memory_gb'], '7.1f'):>7}")
        lines.append(f"{r['row']:<14} {r['seq_len']:>6} {r['params_b']:>6.2f}B | {cells[0]} | {cells[1]} | "
                     f"{_fmt(r.get('speedup'), '6.2f') + 'x' if r.get('speedup') else '-':>7} "
                     f"{_fmt(r.get('memory_ratio'), '4.2f'):>5}")
    return "\n".join(lines + [f"  {e}" for e in errors])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated rows of {', '.join(ROWS)}; NAME{GC_SUFFIX} runs that row with activation "
                        f"checkpointing in both implementations, NAME{GC_SUFFIX}N every Nth layer in ours")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in both")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 2 steps (CI)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    p.add_argument("--impls", default="ours,peer", help="which implementations to run (ours, peer)")
    p.add_argument("--timeout-per-impl", type=float, default=0, metavar="S",
                   help="give up on one implementation of one row after S seconds (build, autotuning and steps "
                        "included; 0 = no limit); it is reported as failed and the next one runs")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="after the timed steps, profile one more step and print the K costliest kernels")
    args = p.parse_args(argv)
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not args.impls or set(args.impls) - set(IMPLS):
        p.error(f"--impls takes a comma-separated subset of {', '.join(IMPLS)}")
    if args.smoke:
        rows, args.steps, args.warmup = SMOKE_ROWS, 2, 1
        device = torch.device(args.device or "cpu")
    else:
        names = [r.strip() for r in args.rows.split(",") if r.strip()]
        try:
            bases = {r: split_row(r)[0] for r in names}
        except ValueError as e:
            p.error(str(e))
        unknown = [r for r in names if bases[r] not in ROWS]
        if unknown or not names:
            p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)} (each optionally with {GC_SUFFIX} "
                    f"or {GC_SUFFIX}N)")
        rows = {r: ROWS[bases[r]] for r in names}
        device = torch.device(args.device or "cuda")
    fla = import_fla("fla.ops.kda") is not None
    log(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
        f"peer: transformers + {'fla kernels' if fla else 'its torch fallbacks (fla not importable)'}")
    results = []
    for name, (make, seq) in rows.items():
        results.append(run_row(name, make(), seq, device, args))
        print(table(results[-1:]), flush=True)
        if args.out:  # after every row: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"device": str(device), "peer_uses_fla": fla, "steps": args.steps, "warmup": args.warmup,
                           "grad_checkpointing": args.grad_checkpointing, "rows": results}, f, indent=2)
    print(table(results))
    if args.out:
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
