"""Entry point of the `kimi-linear` command (also `python -m kimi_linear`).

Subcommand parsers report their own errors: an unknown flag to `serve` prints `serve`'s usage, not the
top-level one. A `ConfigError` about an engine option names its flag too; every error exits with 2.
"""

from __future__ import annotations

import argparse
import sys

from kimi_linear.errors import ConfigError, KimiLinearError


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: arguments it does not know are its own error (argparse would pass them up to
    the top-level parser, which then prints the top-level usage)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    from kimi_linear import __version__
    from kimi_linear.cli import (bench_offline, bench_serve, chat_cmd, generate_cmd, init_cmd, quantize_cmd, serve_cmd,
                                 synthetic_cmd, train_cmd)

    parser = argparse.ArgumentParser(prog="kimi-linear", description="Kimi Linear: model, engine and server.")
    parser.add_argument("--version", action="version", version=f"kimi-linear {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
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
    quantize_cmd.add_parser(sub)
    train_cmd.add_parser(sub)
    synthetic_cmd.add_parser(sub)
    return parser


def describe(e: KimiLinearError) -> str:
    """The error's message; a ConfigError about an engine option also names its flag."""
    msg = str(e)
    if isinstance(e, ConfigError):
        from kimi_linear.cli.engine_args import engine_fields, flag_of

        if e.key in {f.name for f in engine_fields()}:
            msg += f" (flag {flag_of(e.key)})"
    return msg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KimiLinearError as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
