"""The shipped demo model: a ~12M-parameter Kimi Linear hybrid (preset `demo`: 4 KDA + 2 MLA layers, 8 experts)
trained with `kimi-linear train` on the King James Bible, with its own byte-level BPE tokenizer.

Source and licence: the KJV text of Debian's `bible-kjv-text` package (`apt-get install bible-kjv-text`; the
`bible` program of `bible-kjv` prints it). The 1611 translation's copyright has expired (public domain; the
package's copyright file says so); the program that prints it is GPL-2+, and none of it is shipped, only text
derived from its output and weights trained on it.

The whole thing is one command (on a GPU machine with the package installed; ~4 minutes on an H200):

    python -m kimi_linear.tools.demo_model all --out RUN             # prepare RUN/data, train, install

or its steps, one command each (`prepare` needs the package, `train` nothing but the prepared folder):

    python -m kimi_linear.tools.demo_model prepare --out DATA        # corpus splits + tokenizer + word list
    python -m kimi_linear.tools.demo_model train --data DATA --out RUN [--budget-s 200]
    python -m kimi_linear.tools.demo_model install RUN/model         # copy into kimi_linear/assets/demo

- prepare: every verse (31102), grouped into passages of consecutive verses of one chapter of at most
  `PASSAGE_WORDS` words (one training document each); every `HELDOUT_EVERY`-th chapter is held out.
  DATA/train.jsonl holds the training passages as `{"text"}` lines plus, for one passage in `CHAT_EVERY`,
  a `{"messages"}` line (the user gives a verse's first words, the assistant says the whole verse), so
  `chat` answers in kind; DATA/heldout.jsonl the held-out passages. The tokenizer (DATA/tokenizer: Kimi layout,
  `tools/tokenizer.py`) is trained with the `tokenizers` library on the training text only: 4096 BPE ranks +
  256 specials, the Kimi chat template. DATA/words.txt: every word of the training text (lower case);
  DATA/heldout_sample.jsonl: the first `SAMPLE_PASSAGES` held-out passages, shipped with the model.
- train: `kimi-linear train --preset demo` on DATA (TRAIN_FLAGS) within a wall-clock budget: a probe run of
  `PROBE_STEPS` steps measures the step time, which sets --steps (so the schedule's decay fits the budget);
  an HF folder is exported every `SAVE_EVERY` steps (the held-out loss measured every 200), so a run cut short
  still leaves an export; then RUN/model is the export of the lowest held-out loss (`pick_export`) in bf16
  (shards of at most 15 MiB) plus words.txt and heldout_sample.jsonl, and RUN/result.json its held-out perplexity (all
  held-out passages), the same-shape random model's, and a greedy sample of `SAMPLE_PROMPT`.
- install: copy RUN/model into the package (`DEMO_DIR`), which makes it the default model.

`default_model_dir()` is the one switch: the packaged demo model when its weights are there.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(PACKAGE_DIR, "assets", "demo")
NUM_BASE_TOKENS = 4096
PASSAGE_WORDS = 300
HELDOUT_EVERY = 20
CHAT_EVERY = 10
SAMPLE_PASSAGES = 8
SAMPLE_PROMPT = "And God said"
SAVE_EVERY = 100
PROBE_STEPS, PROBE_TIMEOUT_S = 6, 90.0  # the probe's first steps also compile the Triton kernels
STARTUP_S = 15.0  # the training process's start (imports, tokenization, model) before its first step
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 100, 3000, 600
WORDS_FILE = "words.txt"
HELDOUT_SAMPLE_FILE = "heldout_sample.jsonl"
VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
WORD = re.compile(r"[A-Za-z]+")
# What `train` runs (the rest of the flags are the data, tokenizer and output folders).
TRAIN_FLAGS = ["--preset", "demo", "--seq-len", "4096", "--batch-tokens", "16384",
               "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "60", "--schedule", "wsd", "--decay-frac", "0.25",
               "--optimizer", "adamw", "--weight-decay", "0.1", "--save-every", str(SAVE_EVERY), "--log-every", "10",
               "--eval-every", "200", "--dtype", "bfloat16", "--seed", "0"]


# --------------------------------------------------------------------------- the default model
def default_model_dir() -> str | None:
    """The packaged demo model's folder, or None while its weights are not in the package."""
    has_weights = glob.glob(os.path.join(DEMO_DIR, "*.safetensors"))
    return DEMO_DIR if has_weights and os.path.isfile(os.path.join(DEMO_DIR, "config.json")) else None


# --------------------------------------------------------------------------- prepare
def read_verses(text: str) -> list[tuple[str, int, int, str]]:
    """(book, chapter, verse, text) of each line `Ge1:1 In the beginning ...` of the `bible` program's output."""
    verses = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = VERSE.match(line)
        if m is None:
            raise ValueError(f"line {n} is not a verse (`Book<chapter>:<verse> text`): {line[:60]!r}")
        verses.append((m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    return verses


def passages(verses) -> list[tuple[int, list[str]]]:
    """(chapter index, verse texts) of each passage: consecutive verses of one chapter, <= PASSAGE_WORDS words."""
    out, chapter, current, words, last = [], -1, [], 0, None
    for book, ch, _, text in verses:
        if (book, ch) != last:
            if current:
                out.append((chapter, current))
            chapter, current, words, last = chapter + 1, [], 0, (book, ch)
        n = len(text.split())
        if current and words + n > PASSAGE_WORDS:
            out.append((chapter, current))
            current, words = [], 0
        current.append(text)
        words += n
    if current:
        out.append((chapter, current))
    return out


def kjv_text(path: str | None) -> str:
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    if shutil.which("bible") is None:
        raise SystemExit("the `bible` program is missing: apt-get install -y bible-kjv-text (or give --text FILE)")
    return subprocess.run(["bible", "-f", "Ge1:1-Re22:21"], check=True, capture_output=True, text=True).stdout


def prepare(out: str, text_path: str | None = None) -> dict:
    from kimi_linear.tools.presets import preset_config
    from kimi_linear.tools.tokenizer import train_ranks, write_tokenizer

    verses = read_verses(kjv_text(text_path))
    groups = passages(verses)
    train = [" ".join(v) for c, v in groups if c % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [" ".join(v) for c, v in groups if c % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.jsonl"), "w", encoding="utf-8") as f:
        for i, (c, v) in enumerate(g for g in groups if g[0] % HELDOUT_EVERY != HELDOUT_EVERY - 1):
            f.write(json.dumps({"text": " ".join(v)}) + "\n")
            if i % CHAT_EVERY == 0:
                verse = v[0]
                head = " ".join(verse.split()[:max(2, len(verse.split()) // 3)])
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Continue the verse: {head}"},
                                                 {"role": "assistant", "content": verse}]}) + "\n")
    for name, docs in (("heldout.jsonl", held), (HELDOUT_SAMPLE_FILE, held[:SAMPLE_PASSAGES])):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    words = sorted({w.lower() for t in train for w in WORD.findall(t)})
    with open(os.path.join(out, WORDS_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(words) + "\n")
    cfg = preset_config("demo")
    ranks = train_ranks(train, NUM_BASE_TOKENS)
    if len(ranks) != NUM_BASE_TOKENS:
        raise SystemExit(f"the corpus gave {len(ranks)} BPE ranks, fewer than {NUM_BASE_TOKENS}")
    write_tokenizer(os.path.join(out, "tokenizer"), cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"],
                    cfg["pad_token_id"], cfg["model_max_length"], ranks=ranks)
    summary = {"verses": len(verses), "train_passages": len(train), "heldout_passages": len(held),
               "words": len(words), "vocab_size": cfg["vocab_size"]}
    with open(os.path.join(out, "prepare.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


# --------------------------------------------------------------------------- evaluation and samples
def _load(model_dir: str, device: str):
    import torch

    from kimi_linear.loader.tokenizer import load_tokenizer
    from kimi_linear.models import KimiLinearForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = KimiLinearForCausalLM.from_pretrained(model_dir, device=torch.device(device), dtype=dtype, progress=False)
    return model.eval(), load_tokenizer(model_dir)


def heldout_perplexity(model, tokenizer, jsonl: str) -> tuple[float, int]:
    """exp(mean token loss) over the passages of `jsonl` (each `encode(text) + [eos]`, as training sees it),
    and the number of predicted tokens."""
    import torch

    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    loss_sum, num = 0.0, 0
    with open(jsonl, encoding="utf-8") as f, torch.no_grad():
        for line in f:
            ids = tokenizer.encode(json.loads(line)["text"]) + [eos]
            x = torch.tensor([ids], device=device)
            labels = torch.tensor([ids[1:] + [-100]], device=device)
            out = model(x, cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32, device=device), labels=labels)
            loss_sum += out.loss_sum.item()
            num += out.num_tokens.item()
    return math.exp(loss_sum / max(num, 1)), num


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """The greedy continuation of `prompt` (no cache: the whole row each step; the demo model is small)."""
    import torch

    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    stop = set(getattr(tokenizer, "stop_token_ids", None) or [tokenizer.eos_token_id])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + new], device=device))
            nxt = int(logits[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
    return tokenizer.decode(new)


# --------------------------------------------------------------------------- train
def _exports(run: str) -> dict[int | str, str]:
    """The complete HF exports of a run: step number (or "final") -> folder."""
    out: dict[int | str, str] = {}
    for d in glob.glob(os.path.join(run, "hf", "*")):
        if not glob.glob(os.path.join(d, "*.safetensors")) or not os.path.isfile(os.path.join(d, "config.json")):
            continue
        name = os.path.basename(d)
        if name == "final":
            out["final"] = d
        elif name.startswith("step-") and os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
            out[int(name[5:])] = d
    return out


def pick_export(run: str, records: list[dict]) -> str | None:
    """The export to ship: the one at the step of the lowest held-out loss among the steps that have an export
    (the final export counts as the last step), else the latest export."""
    exports = _exports(run)
    if not exports:
        return None
    last = max((r["step"] for r in records), default=0)
    by_step = {(last if k == "final" else k): v for k, v in exports.items()}
    if "final" in exports:
        by_step[last] = exports["final"]
    evals = [(r["eval_loss"], r["step"]) for r in records if "eval_loss" in r and r["step"] in by_step]
    if evals:
        return by_step[min(evals)[1]]
    return by_step[max(by_step)]


def _reshard(src: str, dst: str, max_shard_bytes: int) -> None:
    """Copy the export `src` to `dst` with its weights re-sharded to files of at most max_shard_bytes."""
    import torch

    from kimi_linear.loader.safetensors import save_checkpoint
    from kimi_linear.models import KimiLinearForCausalLM

    model = KimiLinearForCausalLM.from_pretrained(src, device=torch.device("cpu"), dtype=torch.bfloat16, progress=False)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    save_checkpoint(model, dst, max_shard_bytes=max_shard_bytes, dtype=torch.bfloat16, progress=False)


def _train_cmd(data: str, out: str, flags: list[str], eval_data: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "kimi_linear", "train", *flags, "--tokenizer", os.path.join(data, "tokenizer"),
           "--data", os.path.join(data, "train.jsonl"), "--out", out]
    return cmd + (["--eval-data", os.path.join(data, "heldout.jsonl")] if eval_data else [])


def _run(cmd: list[str], timeout_s: float):
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed at the budget"


def _read_metrics(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def measure_step_s(data: str, out: str, flags: list[str], timeout_s: float) -> float | None:
    """The median step time of a PROBE_STEPS-step run of the same configuration (its first steps excluded)."""
    probe = os.path.join(out, "probe")
    shutil.rmtree(probe, ignore_errors=True)
    _run(_train_cmd(data, probe, [*flags, "--steps", str(PROBE_STEPS), "--warmup-steps", "1", "--save-every", "0", "--log-every", "1"],
                    eval_data=False), timeout_s)
    times = sorted(r["step_s"] for r in _read_metrics(probe) if "step_s" in r and r["step"] > 2)
    shutil.rmtree(probe, ignore_errors=True)
    return times[len(times) // 2] if times else None


def train(data: str, out: str, budget_s: float, extra: list[str] | None = None, results: str | None = None,
          steps: int | None = None) -> dict:
    """Train within `budget_s` seconds (the step count from a probe's step time unless `steps` is given), export,
    evaluate and sample; RUN/model is the shipped folder. `results`: also copy model/, result.json and
    metrics.jsonl there (the GPU run's $OUT, without the DCP checkpoints)."""
    import torch

    os.makedirs(out, exist_ok=True)
    flags = [*TRAIN_FLAGS, *(extra or [])]
    t0 = time.perf_counter()
    step_s = None
    if steps is None:
        step_s = measure_step_s(data, out, flags, PROBE_TIMEOUT_S)
        left = budget_s - (time.perf_counter() - t0) - STARTUP_S
        steps = DEFAULT_STEPS if step_s is None else max(MIN_STEPS, min(MAX_STEPS, int(0.9 * left / step_s)))
        print(f"probe: {step_s} s/step -> {steps} steps in the {left:.0f} s left", flush=True)
    flags += ["--steps", str(steps)]
    rc = _run(_train_cmd(data, out, flags), budget_s - (time.perf_counter() - t0))
    train_s = time.perf_counter() - t0
    src = pick_export(out, _read_metrics(out))
    if src is None:
        raise SystemExit(f"training left no export (exit: {rc})")
    model_dir = os.path.join(out, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    _reshard(src, model_dir, 15 * 1024 ** 2)
    for name in (WORDS_FILE, HELDOUT_SAMPLE_FILE):
        shutil.copy(os.path.join(data, name), os.path.join(model_dir, name))
    if results is not None:  # the model first: a limit hit while evaluating still leaves it
        os.makedirs(results, exist_ok=True)
        shutil.copytree(model_dir, os.path.join(results, "model"), dirs_exist_ok=True)
        shutil.copy(os.path.join(out, "metrics.jsonl"), os.path.join(results, "metrics.jsonl"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = _load(model_dir, device)
    ppl, num = heldout_perplexity(model, tok, os.path.join(data, "heldout.jsonl"))
    sample_ppl, _ = heldout_perplexity(model, tok, os.path.join(model_dir, HELDOUT_SAMPLE_FILE))
    sample = greedy(model, tok, SAMPLE_PROMPT)
    random_ppl = _random_perplexity(model, tok, os.path.join(data, "heldout.jsonl"))
    records = _read_metrics(out)
    result = {"export": os.path.relpath(src, out), "train_exit": rc, "train_s": round(train_s, 1),
              "probe_step_s": step_s, "planned_steps": steps,
              "last_step": max((r["step"] for r in records), default=0),
              "last_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
              "heldout_ppl": ppl, "heldout_tokens": num, "heldout_sample_ppl": sample_ppl,
              "random_model_heldout_ppl": random_ppl, "prompt": SAMPLE_PROMPT, "sample": sample,
              "params": sum(p.numel() for p in model.parameters()), "device": device,
              "train_command": " ".join(["kimi-linear", "train", *flags])}
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    if results is not None:
        shutil.copy(os.path.join(out, "result.json"), os.path.join(results, "result.json"))
    print(json.dumps(result, indent=1))
    return result


def _random_perplexity(trained, tokenizer, jsonl: str) -> float:
    """The held-out perplexity of the same shape with random weights (`models.init`, seed 0)."""
    import torch

    from kimi_linear.models import KimiLinearForCausalLM
    from kimi_linear.models.init import init_weights

    p = next(trained.parameters())
    model = KimiLinearForCausalLM.from_config(trained.config, device=p.device, dtype=torch.float32)
    init_weights(model, seed=0)
    model = model.to(p.dtype).eval()
    return heldout_perplexity(model, tokenizer, jsonl)[0]


def install(model_dir: str, dest: str = DEMO_DIR) -> None:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"{model_dir} is not a checkpoint folder")
    for name in os.listdir(dest) if os.path.isdir(dest) else []:
        if name not in ("README.md", "__init__.py"):
            os.remove(os.path.join(dest, name))
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(model_dir):
        shutil.copy(os.path.join(model_dir, name), os.path.join(dest, name))
    print(f"installed {model_dir} into {dest}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kimi_linear.tools.demo_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    a = sub.add_parser("prepare", help="corpus splits, tokenizer and word list into --out")
    a.add_argument("--out", required=True)
    a.add_argument("--text", default=None, help="the `bible -f Ge1:1-Re22:21` output (default: run `bible`)")
    a = sub.add_parser("train", help="kimi-linear train on a prepared folder, then evaluate and sample")
    a.add_argument("--data", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--budget-s", type=float, default=200.0, help="wall-clock budget of probe + training, seconds")
    a.add_argument("--steps", type=int, default=None, help="optimizer steps (default: as many as the budget allows, "
                   "from a probe run's step time)")
    a.add_argument("--results", default=None, help="also copy model/, result.json, metrics.jsonl here")
    a.add_argument("extra", nargs=argparse.REMAINDER, help="more `kimi-linear train` flags (after --)")
    a = sub.add_parser("install", help="copy a trained model folder into the package")
    a.add_argument("model_dir")
    a = sub.add_parser("all", help="prepare OUT/data, train into OUT, install OUT/model")
    a.add_argument("--out", required=True)
    a.add_argument("--text", default=None, help="as for prepare")
    a.add_argument("--budget-s", type=float, default=200.0, help="as for train")
    args = p.parse_args(argv)
    if args.step == "prepare":
        print(json.dumps(prepare(args.out, args.text), indent=1))
    elif args.step == "train":
        extra = [x for x in args.extra if x != "--"]
        train(args.data, args.out, args.budget_s, extra, args.results, args.steps)
    elif args.step == "install":
        install(args.model_dir)
    else:
        data = os.path.join(args.out, "data")
        print(json.dumps(prepare(data, args.text), indent=1))
        train(data, args.out, args.budget_s)
        install(os.path.join(args.out, "model"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
