"""Fixtures of the training tests: a tiny checkpoint folder (the `tiny` preset: hidden 64, 4 layers with
3 KDA + 1 MLA, 16 experts, vocab 1024, with its built tokenizer) and small generated jsonl corpora
(`train_helpers.py`)."""

from __future__ import annotations

import pytest
from train_helpers import chats, repetitive_texts, write_jsonl


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
