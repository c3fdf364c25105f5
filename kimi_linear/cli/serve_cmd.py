"""`kimi-linear serve [MODEL_DIR]`: the OpenAI-compatible server (vLLM's flag names).

The engine flags come from EngineConfig (`engine_args.py`); the server flags are here. vLLM's recipe
(`serve DIR --port 8000 --tensor-parallel-size 1 --max-model-len 1048576 --trust-remote-code`) parses.
"""

from __future__ import annotations

import argparse
import logging
import os

from kimi_linear.cli.engine_args import add_engine_args, engine_kwargs
from kimi_linear.server.defaults import DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_SHUTDOWN_TIMEOUT_S
from kimi_linear.server.tool_parsers import TOOL_PARSERS, check_tool_flags


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


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
                   help="require `Authorization: Bearer KEY` on /v1 routes, /tokenize and /detokenize "
                        "(or set KIMI_LINEAR_API_KEY)")
    g.add_argument("--max-queue-len", type=int, default=4096, help="waiting requests beyond which new ones get 503")
    g.add_argument("--max-request-body-bytes", type=_non_negative(int), default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                   help="request bodies larger than this get 413 (0: no limit)")
    g.add_argument("--shutdown-timeout", type=_non_negative(float), default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
                   help="on SIGTERM / SIGINT, wait this long for requests in flight to finish, then end the "
                        "rest with an error (streams get an error event and [DONE])")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--uvicorn-log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: --log-level)")
    g.add_argument("--enable-log-requests", dest="log_requests", action="store_true", default=False,
                   help="log each request's id, prompt length and sampling params")
    g.add_argument("--disable-log-requests", dest="log_requests", action="store_false",
                   help="do not log requests (the default; accepted as vLLM's older flag)")
    g.add_argument("--enable-auto-tool-choice", action="store_true", default=False,
                   help='parse tool calls when tool_choice is "auto" (the default when a request has tools); '
                        "needs --tool-call-parser")
    g.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help='the tool-call format to parse (kimi_k2: Kimi K2 / Kimi Linear); "required" and named '
                        "tool choices use it too (default for those: kimi_k2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kimi_linear.server.launch import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_tool_flags(args.tool_call_parser, args.enable_auto_tool_choice)
    kwargs = engine_kwargs(args)
    names = args.served_model_name or [os.path.basename(os.path.normpath(kwargs["model"]))]
    serve(kwargs, names, host=args.host, port=args.port, api_key=args.api_key, max_waiting=args.max_queue_len,
          log_level=args.log_level, uvicorn_log_level=args.uvicorn_log_level, log_requests=args.log_requests,
          tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
          max_request_body_bytes=args.max_request_body_bytes or None, shutdown_timeout=args.shutdown_timeout)
    return 0
