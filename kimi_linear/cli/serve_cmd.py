"""`kimi-linear serve [MODEL_DIR]`: the OpenAI-compatible server (vLLM's flag names)."""

from __future__ import annotations

import argparse
import logging
import os

from kimi_linear.cli.engine_args import add_engine_args, engine_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server",
                       description="Serve a checkpoint folder over the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models, /health, /metrics, /tokenize, /detokenize).")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in the `model` field (default: the folder's name)")
    g.add_argument("--api-key", default=os.environ.get("KIMI_LINEAR_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 routes (or set KIMI_LINEAR_API_KEY)")
    g.add_argument("--max-queue-len", type=int, default=4096, help="waiting requests beyond which new ones get 503")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.server.launch import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = engine_kwargs(args)
    names = args.served_model_name or [os.path.basename(os.path.normpath(kwargs["model"]))]
    serve(kwargs, names, host=args.host, port=args.port, api_key=args.api_key, max_waiting=args.max_queue_len,
          log_level=args.log_level)
    return 0
