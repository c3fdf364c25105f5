"""Bad options and bad data fail at once, before anything trains, with a message naming the problem:
exit code 2, `error: ...` (or argparse's usage + the flag) on stderr, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from train_helpers import write_jsonl
from kimi_linear.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        rc = main(["train", *argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc, capsys.readouterr().err


def test_unknown_flag_prints_the_subcommand_usage(capsys):
    rc, err = run_cli(capsys, "--preset", "tiny", "--bogus-flag", "3")
    assert rc == 2
    assert "usage: kimi-linear train" in err and "--bogus-flag" in err


@pytest.mark.parametrize("argv,expect", [
    (["--data", "x.jsonl", "--out", "o"], "--model/--preset: give exactly one"),
    (["--preset", "tiny", "--model", "{ckpt}", "--data", "{data}", "--out", "{out}"], "give exactly one"),
    (["--preset", "nope", "--data", "{data}", "--out", "{out}"], "--preset: unknown preset 'nope'"),
    (["--model", "/no/such/dir", "--data", "{data}", "--out", "{out}"], "--model: /no/such/dir is not a checkpoint"),
    (["--model", "{ckpt}", "--data", "/no/such.jsonl", "--out", "{out}"], "--data: no such file: /no/such.jsonl"),
    (["--model", "{ckpt}", "--data", "{data}"], "--out: an output folder is required"),
    (["--model", "{ckpt}", "--data", "{data}", "--out", "{out}", "--seq-len", "32", "--batch-tokens", "100"],
     "--batch-tokens: 100 is not a multiple of --seq-len x processes = 32 x 1 = 32"),
    (["--model", "{ckpt}", "--data", "{data}", "--out", "{out}", "--min-lr", "1", "--lr", "0.1"], "--min-lr"),
    (["--preset", "tiny", "--data", "{data}", "--out", "{out}", "--lora-rank", "4"], "--lora-rank: LoRA fine-tunes"),
    (["--model", "{ckpt}", "--data", "{data}", "--out", "{out}", "--merge-lora"], "--merge-lora: needs a LoRA run"),
    (["--model", "{ckpt}", "--data", "{data}", "--out", "{out}", "--resume", "/no/ckpt"], "--resume: no such folder"),
    (["--plot", "/no/run"], "--plot: no metrics.jsonl in /no/run"),
    (["--model", "{ckpt}", "--data", "{data}", "--out", "{out}", "--grad-checkpointing-every", "2"],
     "--grad-checkpointing-every: needs --grad-checkpointing"),
    (["--model", "{ckpt}", "--data", "{data}", "--out", "{out}", "--grad-checkpointing", "--grad-checkpointing-every",
      "0"], "--grad-checkpointing-every: must be at least 1, got 0"),
])
def test_bad_options(capsys, tmp_path, tiny_ckpt, text_data, argv, expect):
    argv = [a.format(ckpt=tiny_ckpt, data=text_data, out=tmp_path / "out") for a in argv]
    rc, err = run_cli(capsys, *argv)
    assert rc == 2 and expect in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("lines,expect", [
    ([], "empty"),
    (['{"txt": "hello"}'], ":1:"),
    (['{"text": "ok"}', "not json"], ":2:"),
    (['{"messages": [{"role": "user"}]}'], ":1:"),
    (["{\"text\": \"" + "word " * 200 + "\"}"], "tokens"),
])
def test_bad_data_fails_before_training(capsys, tmp_path, tiny_ckpt, lines, expect):
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    rc, err = run_cli(capsys, "--model", tiny_ckpt, "--data", data, "--out", str(tmp_path / "out"), "--seq-len", "32",
                      "--steps", "1")
    assert rc == 2 and err.startswith("error: ") and "bad.jsonl" in err and expect in err, err
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def test_module_entry_reports_without_traceback(tmp_path, tiny_ckpt):
    """`python -m kimi_linear.train` (what torchrun runs): same flags, same errors, exit 2."""
    data = write_jsonl(tmp_path / "empty.jsonl", [])
    cmd = [sys.executable, "-m", "kimi_linear.train", "--model", tiny_ckpt, "--data", data, "--out",
           str(tmp_path / "o"), "--seq-len", "32"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "error: " in p.stderr and "empty.jsonl" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "kimi_linear.train", "--nope"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "usage: python -m kimi_linear.train" in p.stderr and "--nope" in p.stderr
