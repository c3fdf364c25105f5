"""The `tiny` preset tokenizer (built by the project's builder, 768 BPE ranks + 256 Kimi specials)."""

from __future__ import annotations

import pytest

from kimi_linear.loader.tokenizer import load_tokenizer
from kimi_linear.tools.tokenizer import write_tokenizer


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    write_tokenizer(path, 1024, 768, 770, 1023)
    return load_tokenizer(path)
