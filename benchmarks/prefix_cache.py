"""Prefix caching, cache on vs off: the second-turn TTFT of a chat over a long shared context, and the
throughput of many multi-turn conversations.

    python -m benchmarks.prefix_cache                  # 48b-a3b, dummy bf16, CUDA: 32K and 128K, 64 conversations
    python -m benchmarks.prefix_cache --smoke          # tiny preset on the CPU, small sizes (CI)
    python -m benchmarks.prefix_cache --modes off --parts ttft   # one part / one mode per run (10-minute limits)
    python -m benchmarks.prefix_cache --merge on.json off.json   # summary and ratios of separate runs' --json files

Each mode builds its own engine from config.json alone with random weights (`load_format="dummy"`):
`on` is the default engine (prefix caching on), `off` the same with `enable_prefix_caching=False`;
they run one after the other (the first is shut down and its memory freed before the second loads).

- ttft: per context C, turn 1 is C random tokens plus a user message (`--msg` tokens); the engine
  answers `--answer` tokens (greedy, EOS ignored); turn 2 is turn 1's prompt + the answer + a new
  message. TTFT = wall time from `add_request` to the step that returns the first token (the step
  samples on the host, so the device work is done). With the cache on, turn 2 finds turn 1's
  blocks and the state snapshot taken at the last block boundary of its answer; off, it prefills
  everything. Both engines run both turns, so turn 2 always follows a prefill of the same size (warm
  kernels), and turn 1's TTFT compares a miss with the cache on to the engine without it.
- multiturn: `--conversations` chats, each a shared system prompt (`--system` tokens) plus its own
  first message (`--first-msg`), then `--turns` turns: every turn submits all conversations at once
  (`LLM.generate`), each answers `--answer` tokens, and the next turn appends the answer and a new
  message (`--msg`). Reported: wall time, prompt tokens, tokens the model computed (from
  `LLMEngine.stats()`), generated tokens per second, and the hit rate.

A warm-up conversation (small context, both turns) runs first in each engine so that kernel
compilation is not timed. Prints each number and the on / off ratios; writes JSON to $OUT (and
`--json`) after every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

from benchmarks.common import CompileLog, add_shape_args, log, shape_config, write_report
from kimi_linear import LLM, SamplingParams

SMOKE = dict(preset="tiny", device="cpu", dtype="float32", contexts="96,160", msg=8, answer=5, conversations=3,
             turns=2, system=24, first_msg=8, block_size=16, max_num_batched_tokens=256, max_num_seqs=3,
             warmup_context=16)


def parse_count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2}.get(text[-1:], 1)
    return int(text[:-1] if mult > 1 else text) * mult


def random_tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- one timed request
def first_token_time(engine, rid: str, prompt: list[int], params: SamplingParams, device: str) -> tuple[float, list]:
    """Seconds from add_request to the first token, then run the request to its end; returns (ttft, tokens)."""
    sync(device)
    t0 = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": prompt}, params, stream=True)
    ttft, final = None, None
    while final is None:
        for out in engine.step():
            if out.request_id != rid:
                continue
            if ttft is None and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            if out.finished:
                final = out
    return ttft, final


def chat_turns(engine, rid: str, context: list[int], args, vocab: int, seed: int, device: str) -> dict:
    """Turns 1 and 2 of one chat over `context`; returns their TTFTs and cached tokens."""
    params = SamplingParams(temperature=0, max_tokens=args.answer, ignore_eos=True)
    prompt1 = context + random_tokens(args.msg, seed + 1, vocab)
    row = {"context": len(context), "prompt1": len(prompt1)}
    ttft1, out1 = first_token_time(engine, rid + "-t1", prompt1, params, device)
    answer = list(out1.outputs[0].token_ids)
    row.update(ttft1_s=ttft1, cached1=out1.num_cached_tokens)
    prompt2 = prompt1 + answer + random_tokens(args.msg, seed + 3, vocab)
    ttft2, out2 = first_token_time(engine, rid + "-t2", prompt2, params, device)
    row.update(prompt2=len(prompt2), ttft2_s=ttft2, cached2=out2.num_cached_tokens)
    return row


# ---------------------------------------------------------------- parts
def run_ttft(llm, mode: str, args, device: str) -> list[dict]:
    engine = llm.llm_engine
    vocab = engine.vocab_size
    rows = []
    for C in args.contexts:
        context = random_tokens(C, C, vocab)
        before = engine.stats()
        r = chat_turns(engine, f"ttft{C}", context, args, vocab, C, device)
        after = engine.stats()
        r.update(mode=mode, computed_tokens=after.num_scheduled_tokens - before.num_scheduled_tokens)
        compiles = COMPILES.take()
        r["compiles"] = len(compiles)
        r["compile_s"] = sum(s for _, s in compiles)
        log(f"[{mode}] context {C}: turn-1 TTFT {r['ttft1_s'] * 1e3:.1f} ms, turn-2 TTFT {r['ttft2_s'] * 1e3:.1f} ms "
            f"({r['cached2']} of {r['prompt2']} prompt tokens cached); {CompileLog.summary(compiles)}")
        rows.append(r)
    return rows


def run_multiturn(llm, mode: str, args, device: str) -> dict:
    engine = llm.llm_engine
    vocab = engine.vocab_size
    system = random_tokens(args.system, 7, vocab)
    convs = [system + random_tokens(args.first_msg, 1000 + i, vocab) for i in range(args.conversations)]
    params = SamplingParams(temperature=0, max_tokens=args.answer, ignore_eos=True)
    before = engine.stats()
    prompt_tokens = generated = 0
    turn_s, turn_compile_s = [], []
    COMPILES.take()
    sync(device)
    t0 = time.perf_counter()
    for turn in range(args.turns):
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": c} for c in convs], params, use_tqdm=False)
        sync(device)
        turn_s.append(time.perf_counter() - t)
        prompt_tokens += sum(len(c) for c in convs)
        generated += sum(len(o.outputs[0].token_ids) for o in outs)
        convs = [c + list(o.outputs[0].token_ids) + random_tokens(args.msg, 5000 + 100 * turn + i, vocab)
                 for i, (c, o) in enumerate(zip(convs, outs))]
        compiles = COMPILES.take()
        turn_compile_s.append(sum(s for _, s in compiles))
        log(f"[{mode}] multiturn turn {turn + 1}/{args.turns}: {turn_s[-1]:.2f} s; {CompileLog.summary(compiles)}")
    wall = time.perf_counter() - t0
    after = engine.stats()
    res = {"mode": mode, "conversations": args.conversations, "turns": args.turns, "wall_s": wall, "turn_s": turn_s,
           "turn_compile_s": turn_compile_s,
           "prompt_tokens": prompt_tokens, "generated_tokens": generated,
           "computed_tokens": after.num_scheduled_tokens - before.num_scheduled_tokens,
           "cached_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
           "output_tok_per_s": generated / wall, "total_tok_per_s": (prompt_tokens + generated) / wall,
           "preemptions": after.num_preemptions - before.num_preemptions}
    log(f"[{mode}] multiturn: {wall:.2f} s, {res['output_tok_per_s']:.1f} output tok/s, "
        f"{res['computed_tokens']} tokens computed for {prompt_tokens} prompt tokens, {res['cached_tokens']} cached")
    return res


COMPILES = CompileLog()  # installed by main(): Triton compiles per part and turn, to tell one-time costs from steady ones


def warm_up(llm, args, device: str) -> None:
    engine = llm.llm_engine
    ctx = random_tokens(args.warmup_context, 3, engine.vocab_size)
    chat_turns(engine, "warmup", ctx, args, engine.vocab_size, 3, device)
    engine.reset_prefix_cache()


def build(folder: str, mode: str, args, max_model_len: int) -> LLM:
    t0 = time.perf_counter()
    kw = dict(device=args.device, dtype=args.dtype, load_format="dummy", max_model_len=max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              block_size=args.block_size, enable_prefix_caching=(mode == "on"))
    if mode == "on":
        kw["prefix_cache_state_fraction"] = args.state_fraction
    llm = LLM(folder, **kw)
    s = llm.llm_engine.stats()
    log(f"[{mode}] engine ready in {time.perf_counter() - t0:.1f} s: {s.num_blocks} blocks "
        f"({s.num_blocks * args.block_size} tokens), {s.num_slots} state slots, {s.num_snapshots} state snapshots")
    return llm


def release(llm, device: str) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def ratios(report: dict) -> dict:
    out = {"ttft": [], "multiturn": None}
    by = {(r["mode"], r["context"]): r for r in report["ttft"]}
    for C in sorted({r["context"] for r in report["ttft"]}):
        on, off = by.get(("on", C)), by.get(("off", C))
        if on and off and on["ttft2_s"] and off["ttft2_s"]:
            q = {"context": C, "off_over_on_ttft2": off["ttft2_s"] / on["ttft2_s"]}
            if on.get("ttft1_s") and off.get("ttft1_s"):
                q["on_over_off_ttft1_miss"] = on["ttft1_s"] / off["ttft1_s"]
            out["ttft"].append(q)
    mt = {r["mode"]: r for r in report["multiturn"]}
    if "on" in mt and "off" in mt:
        out["multiturn"] = {"on_over_off_throughput": mt["on"]["total_tok_per_s"] / mt["off"]["total_tok_per_s"],
                            "off_over_on_wall": mt["off"]["wall_s"] / mt["on"]["wall_s"]}
    return out


def save(report: dict, args) -> None:
    report["ratios"] = ratios(report)
    write_report(report, "prefix_cache.json", args.json)


def print_summary(report: dict) -> None:
    print("\nmode  context  prompt-2  cached-2  turn-1 TTFT ms  turn-2 TTFT ms")
    for r in report["ttft"]:
        t1 = f"{r['ttft1_s'] * 1e3:.1f}" if r.get("ttft1_s") else "-"
        print(f"{r['mode'] + ('#' + str(r['repeat'] + 1) if r.get('repeat') else ''):<5} {r['context']:>8} {r['prompt2']:>9} {r['cached2']:>9} {t1:>15} "
              f"{r['ttft2_s'] * 1e3:>15.1f}")
    for r in report["multiturn"]:
        print(f"multiturn {r['mode'] + ('#' + str(r['repeat'] + 1) if r.get('repeat') else ''):<4}: {r['conversations']} conversations x {r['turns']} turns in "
              f"{r['wall_s']:.2f} s, {r['total_tok_per_s']:.0f} tok/s (prompt + output), "
              f"{r['output_tok_per_s']:.1f} output tok/s, {r['computed_tokens']} tokens computed")
    q = report["ratios"]
    for x in q["ttft"]:
        miss = f" (first turn, a miss: on / off = {x['on_over_off_ttft1_miss']:.2f}x)" \
            if "on_over_off_ttft1_miss" in x else ""
        print(f"context {x['context']:>8}: second-turn TTFT off / on = {x['off_over_on_ttft2']:.1f}x{miss}")
    if q["multiturn"]:
        print(f"multiturn throughput on / off = {q['multiturn']['on_over_off_throughput']:.2f}x")
    for e in report["errors"]:
        print(f"error in {e['mode']} {e['part']}: {e['error']}")


def merge(args) -> dict:
    report = {"ttft": [], "multiturn": [], "errors": [], "merged": list(args.merge)}
    for path in args.merge:
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cannot read {path}: {e}") from None
        for k in ("device", "preset", "model", "dtype"):
            report.setdefault(k, part.get(k))
        for k in ("ttft", "multiturn", "errors"):
            report[k] += part.get(k, [])
    save(report, args)
    print_summary(report)
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU with small sizes (CI)")
    add_shape_args(ap, None, "model shape preset (default 48b-a3b)")
    ap.add_argument("--modes", default="on,off", help="on and/or off (prefix caching)")
    ap.add_argument("--parts", default="ttft,multiturn", help="ttft and/or multiturn")
    ap.add_argument("--contexts", default=None, help="shared contexts of the TTFT part (default 32K,128K)")
    ap.add_argument("--msg", type=int, default=None, help="tokens of each user message (default 128)")
    ap.add_argument("--answer", type=int, default=None, help="tokens of each answer (default 128)")
    ap.add_argument("--conversations", type=int, default=None, help="multiturn conversations (default 64)")
    ap.add_argument("--turns", type=int, default=None, help="multiturn turns (default 4)")
    ap.add_argument("--system", type=int, default=None, help="shared system prompt tokens (default 1024)")
    ap.add_argument("--first-msg", type=int, default=None, help="each conversation's first message (default 1024)")
    ap.add_argument("--warmup-context", type=int, default=None,
                    help="context of the warm-up chat (default: 2 x max_num_batched_tokens, full chunks)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="prefill chunk budget (default 8192)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the number of conversations")
    ap.add_argument("--state-fraction", type=float, default=0.3,
                    help="prefix_cache_state_fraction of the `on` engine (snapshots for every conversation)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the parts this many times per engine (the cache reset between): the first run "
                         "pays the one-time Triton compiles, which are logged per part and turn")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print the summary and ratios of earlier runs' JSON "
                                                               "files (e.g. one per mode) and write them merged")
    args = ap.parse_args(argv)
    COMPILES.install()
    if args.merge:
        return merge(args)
    defaults = dict(preset="48b-a3b", dtype="bfloat16", contexts="32K,128K", msg=128, answer=128, conversations=64,
                    turns=4, system=1024, first_msg=1024, block_size=64, max_num_batched_tokens=8192,
                    warmup_context=None, device=None, max_num_seqs=None)
    if args.smoke:
        defaults.update(SMOKE)
    for k, v in defaults.items():
        if getattr(args, k, None) is None and not (k == "preset" and args.model):
            setattr(args, k, v)
    args.max_num_seqs = args.max_num_seqs or args.conversations
    args.warmup_context = args.warmup_context or 2 * args.max_num_batched_tokens
    args.contexts = [parse_count(c) for c in args.contexts.split(",") if c.strip()]
    args.device = str(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for m in modes:
        if m not in ("on", "off"):
            raise SystemExit(f"unknown mode {m!r} (on, off)")
    for p in parts:
        if p not in ("ttft", "multiturn"):
            raise SystemExit(f"unknown part {p!r} (ttft, multiturn)")
    config = shape_config(args)
    turn_tokens = 2 * args.msg + 2 * args.answer
    multiturn_len = args.system + args.first_msg + args.turns * (args.msg + args.answer)
    max_model_len = 64 + max(max(args.contexts, default=0) + turn_tokens, multiturn_len,
                             args.warmup_context + turn_tokens)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    log(f"device {gpu}; preset {args.preset or args.model}; modes {modes}; parts {parts}; "
        f"max_model_len {max_model_len}")
    report = {"device": gpu, "preset": args.preset, "model": args.model, "dtype": args.dtype,
              "args": {k: v for k, v in vars(args).items() if k != "json"}, "ttft": [], "multiturn": [], "errors": []}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        for mode in modes:
            try:
                llm = build(tmp, mode, args, max_model_len)
            except Exception as e:  # keep the other mode's numbers
                report["errors"].append({"mode": mode, "part": "build", "error": repr(e)})
                log(f"[{mode}] engine failed to build: {e!r}")
                continue
            try:
                try:
                    warm_up(llm, args, args.device)
                except Exception as e:
                    report["errors"].append({"mode": mode, "part": "warmup", "error": repr(e)})
                    log(f"[{mode}] warm-up failed: {e!r}")
                    continue
                log(f"[{mode}] warm-up: {CompileLog.summary(COMPILES.take())}")
                for rep in range(args.repeat):
                    if rep:  # the same part again, cold cache, warm kernels
                        llm.llm_engine.reset_prefix_cache()
                    for part in parts:
                        try:
                            if part == "ttft":
                                rows = run_ttft(llm, mode, args, args.device)
                                report["ttft"] += [dict(r, repeat=rep) for r in rows]
                            else:
                                report["multiturn"].append(dict(run_multiturn(llm, mode, args, args.device), repeat=rep))
                        except Exception as e:
                            report["errors"].append({"mode": mode, "part": part, "error": repr(e)})
                            log(f"[{mode}] {part} failed: {e!r}")
                        save(report, args)
            finally:
                release(llm, args.device)
    save(report, args)
    print_summary(report)
    return report


if __name__ == "__main__":
    main()
