"""Entry point of the `kimi-linear` command (also `python -m kimi_linear`)."""

from __future__ import annotations

import argparse
import sys

from kimi_linear.errors import KimiLinearError


def build_parser() -> argparse.ArgumentParser:
    from kimi_linear import __version__
    from kimi_linear.cli import bench_offline, bench_serve, chat_cmd, generate_cmd, init_cmd, serve_cmd

    parser = argparse.ArgumentParser(prog="kimi-linear", description="Kimi Linear: model, engine and server.")
    parser.add_argument("--version", action="version", version=f"kimi-linear {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve_cmd.add_parser(sub)
    generate_cmd.add_parser(sub)
    chat_cmd.add_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks: serve (against a server), latency, throughput (offline)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="KIND")
    bench_sub.required = True
    bench_serve.add_parser(bench_sub)
    bench_offline.add_parsers(bench_sub)
    init_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KimiLinearError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
