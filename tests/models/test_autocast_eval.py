"""Evaluation during training: an fp32 master model run without grad under bf16 autocast (the trainer's
`--eval-data` loop, the synthetic tasks' accuracy) on the kernel path gives the logits and loss of the same
call under autograd (the ops take their training forms under autocast, `ops/dispatch.training_forms`), where
the inference kernels used to reject the fp32 residual beside a bf16 branch."""

from __future__ import annotations

import pytest
import torch

from kimi_linear import KimiLinearForCausalLM
from kimi_linear.config import ModelConfig
from kimi_linear.models.init import init_weights
from kimi_linear.ops.dispatch import is_interpreter
from kimi_linear.tools.presets import preset_config


@pytest.fixture
def device(monkeypatch):
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not is_interpreter():
        pytest.skip("the kernel path needs CUDA or the Triton interpreter")
    monkeypatch.setenv("KIMI_LINEAR_TRITON_ON_CPU", "1")
    return torch.device("cpu")


def test_no_grad_autocast_eval_equals_the_autograd_call(device):
    model = KimiLinearForCausalLM.from_config(ModelConfig.from_dict(preset_config("tiny")), dtype=torch.float32)
    init_weights(model, seed=3)
    model.to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0)).to(device)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device)
    labels = torch.roll(ids, -1, 1)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            logits = model(ids, cu_seqlens=cu)
            out = model(ids, cu_seqlens=cu, labels=labels)
        ref = model(ids, cu_seqlens=cu, labels=labels)  # grad on: the training step's forms
    assert logits.shape == (1, 24, model.config.vocab_size) and torch.isfinite(logits).all()
    assert out.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-5)
