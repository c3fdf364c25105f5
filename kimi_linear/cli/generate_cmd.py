"""`kimi-linear generate [MODEL_DIR] --prompt TEXT`: one-shot offline generation, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from kimi_linear.cli.engine_args import add_engine_args, engine_kwargs


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config, else 1)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace, defaults: dict):
    from kimi_linear.sampling_params import SamplingParams

    fields = {k: v for k, v in defaults.items()}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        v = getattr(args, name)
        if v is not None:
            fields[name] = v
    return SamplingParams(max_tokens=args.max_tokens, seed=getattr(args, "seed", None), stop=args.stop or [],
                          ignore_eos=args.ignore_eos, **fields)


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
    from kimi_linear.engine.config import EngineConfig, default_sampling_kwargs
    from kimi_linear.engine.llm_engine import LLMEngine
    from kimi_linear.errors import ValidationError

    engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
    params = sampling_params(args, default_sampling_kwargs(engine.generation_config))
    if args.prompt_token_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_token_ids.split(",") if x.strip()]
        except ValueError:
            raise ValidationError("--prompt-token-ids must be comma-separated integers",
                                  param="prompt_token_ids") from None
        prompt = {"prompt_token_ids": ids}
    else:
        text = args.prompt if args.prompt is not None else "The capital of France is"
        if args.chat:
            from kimi_linear.loader.chat_template import apply_chat_template

            if engine.tokenizer is None:
                raise ValidationError("--chat needs a tokenizer in the checkpoint folder", param="chat")
            text = apply_chat_template(engine.tokenizer, [{"role": "user", "content": text}])
        prompt = text
        if args.prompt is None and not args.chat:
            print(text, end="", flush=True)
    engine.add_request("0", prompt, params, stream=True)
    shown_text, shown_ids = 0, 0
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            last = c
            if engine.tokenizer is not None:
                sys.stdout.write(c.text[shown_text:])
                shown_text = len(c.text)
            else:
                sys.stdout.write("".join(f" {t}" for t in c.token_ids[shown_ids:]))
                shown_ids = len(c.token_ids)
            sys.stdout.flush()
    print()
    if last is not None:
        print(f"[{len(last.token_ids)} tokens, finish_reason={last.finish_reason}]", file=sys.stderr)
    engine.shutdown()
    return 0
