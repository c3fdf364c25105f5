"""The flags of `kimi-linear synthetic` and the command: plan, run (or re-report), write the table and figures.

    kimi-linear synthetic                       # the full grid: 3 tasks x 256..2048 x KDA / GDN / MLA
    kimi-linear synthetic --quick               # CPU smoke test: tiny lengths and steps, in this process
    kimi-linear synthetic --report-from OUT/curves.jsonl --out docs/synthetic   # table + figures only

Outputs in --out: curves.jsonl (every evaluation, as measured), results.json and results.md (best accuracy per
task x length x mixer beside the report's numbers), table.png and curves_<N>.png (accuracy vs step at
--curves-length). PNGs are skipped with a warning when matplotlib is missing (re-render with --report-from).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time

logger = logging.getLogger(__name__)

DEFAULT_OUT = os.path.join("docs", "synthetic")
QUICK = dict(lengths="16,32", steps=2, eval_every=2, eval_sequences=4, batch_tokens=32, min_batch=2,
             hidden_size=64, workers=0, curves_length=32, run_wall_s=60.0, budget_s=300.0, warmup_steps=2)


def default_workers() -> int:
    """Runs at once by default: a quarter of the CPU cores, 1 to 4 (each run is a process plus its data worker)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


DEFAULT_SHARES = "mqar=2.5,mla=0.5"


def _shares(text: str) -> dict[str, float]:
    """`name=weight,...` (task or mixer names) -> {name: weight}."""
    out = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=WEIGHT") from None
        if not sep or not out[name.strip()] > 0:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a positive number")
    return out


def _csv(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=_csv(str), default="palindrome,mqar,stack", help="comma-separated tasks")
    p.add_argument("--lengths", type=_csv(int), default="256,512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--mixers", type=_csv(str), default="kda,gdn,mla", help="comma-separated token mixers")
    p.add_argument("--steps", type=int, default=4000, help="step budget of each run (default: 4000)")
    p.add_argument("--run-wall-s", type=float, default=300.0, help="wall-clock budget of each run, seconds")
    p.add_argument("--budget-s", type=float, default=320.0, help="wall-clock budget of the whole suite, seconds "
                   "(runs started late get what is left)")
    p.add_argument("--workers", type=int, default=default_workers(), help="runs at once, each its own process on "
                   "the device (0: one after another in this process; default: a quarter of the CPU cores, 1 to 4: "
                   "processes time-slice one GPU, so more runs at once only split it finer)")
    p.add_argument("--shares", type=_shares, default=DEFAULT_SHARES, help="time weights of the runs, by task and by "
                   "mixer (a run's weight is the product; 1 where absent): each run gets its weight's part of its "
                   f"lane's time left (default: {DEFAULT_SHARES}: MQAR needs the most steps, 2K-20K in the report; "
                   "full attention is the reference)")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per step (sequences = this / length)")
    p.add_argument("--min-batch", type=int, default=8, help="at least this many sequences per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate after warm-up (default: 2e-3)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the decoder's matrices "
                   "(never the embedding or lm_head)")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences per evaluation")
    p.add_argument("--target-acc", type=float, default=0.99, help="stop a run once it reaches this accuracy")
    p.add_argument("--mqar-vocab", type=int, default=None, help="MQAR's vocabulary (default: 1024, the "
                   "committed table's; Zoology's 8192 learnt nothing in the same budget)")
    p.add_argument("--mqar-pairs", type=int, default=None, help="MQAR's key-value pairs per sequence at every "
                   "length (default: the length / 16, so longer sequences hold more to recall; Zoology fixes them)")
    p.add_argument("--hidden-size", type=int, default=256, help="model width (2 heads of 128 in every mixer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the generated data")
    p.add_argument("--curves-length", type=int, default=1024, help="length whose accuracy-vs-step curves are drawn")
    p.add_argument("--device", default="auto", help="cuda or cpu (auto: cuda when available)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: lengths 16,32, 4 steps, width 64, in-process")
    p.add_argument("--report-from", metavar="CURVES", default=None,
                   help="train nothing: write the table and figures from an existing curves.jsonl")


def _apply_quick(args: argparse.Namespace) -> None:
    """--quick's settings, for every flag left at its default."""
    defaults = vars(_defaults())
    for key, value in QUICK.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, _csv(int)(value) if key == "lengths" else value)


def _defaults() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_args(p)
    return p.parse_args([])


def validate(args: argparse.Namespace) -> None:
    from kimi_linear.errors import ConfigError
    from kimi_linear.train.synthetic.models import MIXERS
    from kimi_linear.train.synthetic.tasks import TASKS

    if isinstance(args.shares, str):  # the default, as argparse leaves it when the flag is absent
        args.shares = _shares(args.shares)
    bad = [k for k in args.shares if k not in TASKS and k not in MIXERS]
    if bad:
        raise ConfigError("--shares", f"unknown {bad}; the names are tasks ({', '.join(TASKS)}) or mixers "
                          f"({', '.join(MIXERS)})")
    for flag, values, allowed in (("--tasks", args.tasks, TASKS), ("--mixers", args.mixers, MIXERS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ConfigError(flag, f"unknown {bad or 'none given'}; choose from {', '.join(allowed)}")
    if not args.lengths or any(n < 4 or n % 2 for n in args.lengths):
        raise ConfigError("--lengths", f"each length must be even and at least 4, got {args.lengths}")
    for flag, v in (("--steps", args.steps), ("--eval-every", args.eval_every), ("--eval-sequences", args.eval_sequences),
                    ("--batch-tokens", args.batch_tokens), ("--min-batch", args.min_batch)):
        if v < 1:
            raise ConfigError(flag, f"must be at least 1, got {v}")
    if args.workers < 0:
        raise ConfigError("--workers", f"must not be negative, got {args.workers}")
    from kimi_linear.train.synthetic.tasks import make_task

    vocab = make_task("mqar", args.mqar_vocab).vocab_size
    pairs = args.mqar_pairs if args.mqar_pairs is not None else max(args.lengths) // 16
    if args.mqar_pairs is not None and "mqar" in args.tasks:
        if args.mqar_pairs < 1:
            raise ConfigError("--mqar-pairs", f"must be at least 1, got {args.mqar_pairs}")
        if 4 * args.mqar_pairs > min(args.lengths):
            raise ConfigError("--mqar-pairs", f"{args.mqar_pairs} key-value pairs need every length >= "
                              f"{4 * args.mqar_pairs}, got {min(args.lengths)}")
    if "mqar" in args.tasks and vocab // 2 - 1 < pairs:
        raise ConfigError("--mqar-vocab", f"{vocab} holds too few distinct keys for {pairs} "
                          f"key-value pairs (length {max(args.lengths)}): pass a larger --mqar-vocab")
    if not args.lr > 0:
        raise ConfigError("--lr", f"must be positive, got {args.lr}")
    if args.report_from is not None and not os.path.isfile(args.report_from):
        raise ConfigError("--report-from", f"no such file: {args.report_from}")


def _write_outputs(curves: str, out: str, command: str, device: str, curves_length: int) -> dict:
    from kimi_linear.train.synthetic.report import load_curves, summarize, write_report

    records = load_curves(curves)
    payload = write_report(records, out, command, device)
    try:
        from kimi_linear.train.synthetic.plot import plot_curves, plot_table

        runs = summarize(records)
        plot_table(runs, out)
        plot_curves(runs, out, curves_length)
    except ImportError as e:
        logger.warning("no figures (%s): re-render with --report-from %s", e, curves)
    return payload


def run(args: argparse.Namespace) -> int:
    import shutil

    import torch

    if args.quick:
        _apply_quick(args)
    validate(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    command = "kimi-linear synthetic " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if len(sys.argv) > 2 else []))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    if args.report_from is not None:
        curves = os.path.join(args.out, "curves.jsonl")
        if os.path.abspath(args.report_from) != os.path.abspath(curves):
            shutil.copyfile(args.report_from, curves)
        made_by, made_on = command, None  # the run's own command and device when its results.json is beside
        beside = os.path.join(os.path.dirname(os.path.abspath(args.report_from)), "results.json")
        if os.path.isfile(beside):
            with open(beside, encoding="utf-8") as f:
                previous = json.load(f)
            made_by, made_on = previous.get("command") or command, previous.get("device")
        payload = _write_outputs(curves, args.out, made_by, made_on, args.curves_length)
        print(f"wrote the table and figures of {len(payload['runs'])} runs to {args.out}")
        return 0
    from kimi_linear.train.synthetic.run import plan, run_suite

    specs = plan(args.tasks, args.lengths, args.mixers, shares=args.shares, steps=args.steps, wall_s=args.run_wall_s,
                 batch_tokens=args.batch_tokens, min_batch=args.min_batch, lr=args.lr, warmup_steps=args.warmup_steps,
                 weight_decay=args.weight_decay,
                 eval_every=args.eval_every, eval_sequences=args.eval_sequences, target_acc=args.target_acc,
                 seed=args.seed, hidden_size=args.hidden_size, mqar_vocab=args.mqar_vocab,
                 mqar_pairs=args.mqar_pairs)
    t0 = time.perf_counter()
    if args.workers == 0:
        curves = _run_inline(specs, args.out, device, args.budget_s)
    else:
        curves = run_suite(specs, args.out, args.workers, args.budget_s, device)
    # named only now: asking CUDA for the name makes a context, which this process must not hold while workers run
    label = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    payload = _write_outputs(curves, args.out, command, label, args.curves_length)
    from kimi_linear.train.synthetic.report import RESULTS_MD

    with open(os.path.join(args.out, RESULTS_MD), encoding="utf-8") as f:
        print(f.read())
    print(f"{len(payload['runs'])} runs in {time.perf_counter() - t0:.0f} s; outputs in {args.out}")
    return 0


def _run_inline(specs, out: str, device: str, budget_s: float) -> str:
    """Every run one after another in this process (--workers 0; what --quick does)."""
    import torch

    from kimi_linear.train.synthetic.run import CURVES_FILE
    from kimi_linear.train.synthetic.train_one import RunSpec, train_one
    from kimi_linear.train.synthetic.worker import append_record

    curves = os.path.join(out, CURVES_FILE)
    if os.path.exists(curves):
        os.remove(curves)
    start = time.perf_counter()
    for spec in specs:
        left = budget_s - (time.perf_counter() - start)
        if left <= 0:
            logger.warning("budget spent before %s", spec.key)
            break
        spec = RunSpec(**{**spec.to_dict(), "wall_s": min(spec.wall_s, left)})
        train_one(spec, torch.device(device), lambda rec: append_record(curves, rec))
    return curves
