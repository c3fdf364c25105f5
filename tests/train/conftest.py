"""Fixtures of the training tests: a tiny checkpoint folder (the `tiny` preset: hidden 64, 4 layers with
3 KDA + 1 MLA, 16 experts, vocab 1024, with its built tokenizer) and small generated jsonl corpora."""

from __future__ import annotations

import json

import pytest


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def repetitive_texts(n: int = 48) -> list[dict]:
    """A repetitive corpus a tiny model learns in a few dozen steps."""
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    out = []
    for i in range(n):
        a, b = words[i % 8], words[(i * 3 + 1) % 8]
        out.append({"text": f"the {a} {b} sat on the {a} mat."})
    return out


def chats(n: int = 16) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"count to {i % 5 + 2}"},
                          {"role": "assistant", "content": " ".join(str(j) for j in range(1, i % 5 + 3))}]}
            for i in range(n)]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from kimi_linear.tools.create import create_checkpoint

    path = tmp_path_factory.mktemp("tiny_ckpt")
    create_checkpoint(path, "tiny", seed=0, progress=False, dtype="float32")
    return str(path)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", repetitive_texts())


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chats())
