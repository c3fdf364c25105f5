"""`kimi-linear synthetic ...`: the Kimi Linear report's synthetic tasks (Palindrome, MQAR, Stack) on 2-layer KDA,
GDN and full-attention models; the flags and the work live in `kimi_linear.train.synthetic` (cli.py)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kimi_linear.train.synthetic.cli import __doc__ as doc
    from kimi_linear.train.synthetic.cli import add_args, run

    p = sub.add_parser("synthetic", help="the report's synthetic tasks: KDA vs GDN vs full attention",
                       description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=run)
