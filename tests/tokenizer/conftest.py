"""A small BPE tokenizer folder built inside the tests (ranks trained on a few sentences)."""

from __future__ import annotations

import json

import pytest

from kimi_linear.loader.tokenizer import KimiTokenizer, write_ranks
from kimi_linear.tools.tokenizer import special_token_names, train_ranks

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 12345 degrees today; we've seen 67890 more.\n"
    "你好，世界！今天天气很好。  こんにちは世界  Привет, мир! naïve café 😀🚀✨ déjà vu\n"
    "    indented code: def f(x): return x + 1\n\n\n" * 3
)


def build_ranks(num_merges: int = 300) -> dict[bytes, int]:
    return train_ranks([TRAIN_TEXT], 256 + num_merges)


@pytest.fixture(scope="session")
def bpe_folder(tmp_path_factory):
    """tiktoken.model + tokenizer_config.json (Kimi layout specials) written by the test."""
    path = tmp_path_factory.mktemp("bpe")
    ranks = build_ranks()
    write_ranks(str(path / "tiktoken.model"), ranks)
    names = special_token_names(len(ranks))
    cfg = {"added_tokens_decoder": {str(i): {"content": n, "special": True} for i, n in names.items()
                                    if "reserved" not in n},
           "bos_token": "[BOS]", "eos_token": "<|im_end|>", "pad_token": "[PAD]"}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tok(bpe_folder) -> KimiTokenizer:
    return KimiTokenizer.from_pretrained(bpe_folder)
