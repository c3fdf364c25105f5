"""Shared test setup.

- Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before triton is
  imported) so CI checks every kernel against its fp32 reference at tiny shapes; the interpreter's bugs
  are patched here, on the test side (`triton_interpreter.py`), never by the package.
- `gpu`-marked tests skip without CUDA.
- `poison_empty`: torch.empty / empty_like / new_empty called from kimi_linear return NaN-filled
  tensors, so a kernel that reads scratch memory it never wrote fails loudly.
"""

from __future__ import annotations

import os
import sys

HAS_CUDA = False
try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    pass
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton_interpreter  # noqa: E402

triton_interpreter.apply()  # interpreter mode only


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def _called_from_package() -> bool:
    f = sys._getframe(2)
    return "kimi_linear" in f.f_code.co_filename and "/tests/" not in f.f_code.co_filename


@pytest.fixture
def poison_empty(monkeypatch):
    """NaN-fill uninitialised tensors allocated by kimi_linear code during the test."""
    orig_empty, orig_like, orig_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty(*args, **kwargs):
        t = orig_empty(*args, **kwargs)
        return poison(t) if _called_from_package() else t

    def empty_like(*args, **kwargs):
        t = orig_like(*args, **kwargs)
        return poison(t) if _called_from_package() else t

    def new_empty(self, *args, **kwargs):
        t = orig_new(self, *args, **kwargs)
        return poison(t) if _called_from_package() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A `tiny` preset folder (config, generation config, weights), written once per session."""
    from kimi_linear.tools.create import create_checkpoint

    path = tmp_path_factory.mktemp("tiny")
    create_checkpoint(path, "tiny", seed=0, progress=False)
    return path
