"""`kimi-linear generate [MODEL_DIR] --prompt TEXT`: one-shot offline generation, streamed to stdout.

Runs on the offline `LLM` (`LLM.stream`). Sampling flags left out take the checkpoint's
generation_config.json defaults (`--generation-config`), then SamplingParams' own; `--max-tokens`
falls back to generation_config's max_new_tokens, else DEFAULT_MAX_TOKENS.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from kimi_linear.cli.engine_args import add_engine_args, engine_kwargs

DEFAULT_MAX_TOKENS = 64
DEMO_PROMPT = "The capital of France is"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate (default: generation_config's max_new_tokens, else {DEFAULT_MAX_TOKENS})")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config, else 1)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace, llm):
    """SamplingParams from the flags given; the others from the checkpoint's defaults (each field once)."""
    params = llm.get_default_sampling_params()
    given = {name: getattr(args, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                   "max_tokens") if getattr(args, name) is not None}
    if "max_tokens" not in given and "max_tokens" not in llm.llm_engine.sampling_defaults:
        given["max_tokens"] = DEFAULT_MAX_TOKENS
    return dataclasses.replace(params, seed=getattr(args, "seed", None), stop=args.stop or [],
                               ignore_eos=args.ignore_eos, **given)


def make_llm(args: argparse.Namespace):
    from kimi_linear.llm import LLM

    kw = engine_kwargs(args)
    return LLM(kw.pop("model"), **kw)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion offline (no server)",
                       description="Load the model in-process and complete one prompt, streaming the text.")
    add_engine_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (default: a short demo prompt)")
    src.add_argument("--prompt-token-ids", default=None, help="comma-separated token ids instead of text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.errors import ValidationError

    llm = make_llm(args)
    params = sampling_params(args, llm)
    tok = llm.get_tokenizer()
    if args.prompt_token_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_token_ids.split(",") if x.strip()]
        except ValueError:
            raise ValidationError("--prompt-token-ids must be comma-separated integers",
                                  param="prompt_token_ids") from None
        outputs = llm.stream({"prompt_token_ids": ids}, params)
    else:
        text = args.prompt if args.prompt is not None else DEMO_PROMPT
        if args.chat:
            if tok is None:
                raise ValidationError("--chat needs a tokenizer in the checkpoint folder", param="chat")
            outputs = llm.chat_stream([{"role": "user", "content": text}], params)
        else:
            if args.prompt is None:
                print(text, end="", flush=True)
            outputs = llm.stream(text, params)
    shown_text, shown_ids = 0, 0
    last = None
    for out in outputs:
        c = out.outputs[0]
        last = c
        if tok is not None:
            sys.stdout.write(c.text[shown_text:])
            shown_text = len(c.text)
        else:
            sys.stdout.write("".join(f" {t}" for t in c.token_ids[shown_ids:]))
            shown_ids = len(c.token_ids)
        sys.stdout.flush()
    print()
    if last is not None:
        print(f"[{len(last.token_ids)} tokens, finish_reason={last.finish_reason}]", file=sys.stderr)
    llm.shutdown()
    return 0
