"""The `tiny` preset tokenizer and an xgrammar backend over it (stop tokens: <|im_end|>, [EOS])."""

from __future__ import annotations

import pytest

from kimi_linear.loader.tokenizer import load_tokenizer
from kimi_linear.structured import make_backend
from kimi_linear.tools.tokenizer import write_tokenizer


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    write_tokenizer(path, 1024, 768, 770, 1023)
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def backend(tiny_tok):
    return make_backend(tiny_tok, 1024, [770, 769])
