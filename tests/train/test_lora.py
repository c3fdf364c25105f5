"""LoRA on the tiny model: unchanged at the start, only adapters train, PEFT-layout round trip, exact merge,
the inference fused-row path sees the adapters, and (when peft is installed) our adapter files load with
peft on transformers' KimiLinearForCausalLM with the same logits (fp32, 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from safetensors.torch import load_file, save_file

from kimi_linear import KimiLinearForCausalLM
from kimi_linear.errors import CheckpointError, ConfigError
from kimi_linear.train.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, linear_modules, load_lora_adapter,
                                    lora_parameters, merge_lora, save_lora_adapter)

TARGETS = ["q_proj", "o_proj", "kv_b_proj", "f_a_proj", "gate_proj", "down_proj"]
RANK, ALPHA = 4, 8.0


@pytest.fixture
def model(tiny_checkpoint):
    return KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)


@pytest.fixture
def tokens():
    return torch.randint(0, 768, (1, 24), generator=torch.Generator().manual_seed(3))


def randomize_adapters(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, x):
    with torch.no_grad():
        return model(x)


def test_apply_leaves_outputs_unchanged_and_freezes_base(model, tokens):
    ref = logits(model, tokens)
    spec = apply_lora(model, RANK, ALPHA, TARGETS)
    assert len(spec.modules) == 4 * 3 + 4 * 2  # q, o and f_a or kv_b per mixer; gate, down per (shared) MLP
    assert torch.equal(logits(model, tokens), ref)
    adapters = {id(p) for p in lora_parameters(model)}
    assert len(adapters) == 2 * len(spec.modules)
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in adapters), name
        if name.endswith("lora_B"):
            assert not p.any(), f"{name}: B starts at zero"


def test_optimizer_step_changes_only_adapters(model, tokens):
    apply_lora(model, RANK, ALPHA, TARGETS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(2):
        out = model(tokens)
        loss = F.cross_entropy(out[0, :-1], tokens[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (".lora_A" in k or ".lora_B" in k), k


def test_inference_path_sees_the_adapters(model, tokens):
    """The no-autograd forward (fused-row groups, layers/fused.py) reads the parametrized weights too."""
    base = logits(model, tokens)
    apply_lora(model, RANK, ALPHA, TARGETS)
    randomize_adapters(model)
    with torch.inference_mode():
        fused = model(tokens)
    separate = model(tokens).detach()  # autograd on: the separate projections
    assert rel_err(separate, fused) < 1e-5
    assert rel_err(base, fused) > 1e-2
    # adapters changed in place after an inference forward: the next one must not reuse stale fused weights
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        fused2 = model(tokens)
    assert rel_err(model(tokens).detach(), fused2) < 1e-5
    assert rel_err(fused, fused2) > 1e-2


def test_save_load_round_trip(model, tokens, tiny_checkpoint, tmp_path):
    apply_lora(model, RANK, ALPHA, TARGETS)
    randomize_adapters(model)
    save_lora_adapter(model, tmp_path, tiny_checkpoint)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (RANK, ALPHA, TARGETS)
    assert cfg["base_model_name_or_path"] == str(tiny_checkpoint)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.block_sparse_moe.shared_experts.gate_proj.lora_B.weight" in tensors
    assert tensors["base_model.model.model.layers.3.self_attn.kv_b_proj.lora_A.weight"].shape[0] == RANK
    assert len(tensors) == len(lora_parameters(model))

    fresh = KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)
    spec = load_lora_adapter(fresh, tmp_path)
    assert spec.modules == model.lora_spec.modules
    for a, b in zip(lora_parameters(model), lora_parameters(fresh)):
        assert torch.equal(a, b)
    assert torch.equal(logits(fresh, tokens), logits(model, tokens))


def test_merge_equals_base_plus_delta(model, tokens):
    base = {path: m.weight.detach().clone() for path, m in linear_modules(model).items()}
    names = [n for n, _ in model.named_parameters()]
    spec = apply_lora(model, RANK, ALPHA, TARGETS)
    randomize_adapters(model)
    lora_out = logits(model, tokens)
    adapters = {path: (m.parametrizations.weight[0].lora_A.detach().clone(),
                       m.parametrizations.weight[0].lora_B.detach().clone())
                for path, m in linear_modules(model).items() if path in spec.modules}
    merge_lora(model)
    assert model.lora_spec is None and lora_parameters(model) == []
    assert [n for n, _ in model.named_parameters()] == names  # the plain model again, same names
    for path, m in linear_modules(model).items():
        if path in adapters:
            A, B = adapters[path]
            assert torch.allclose(m.weight, base[path] + B @ A * (ALPHA / RANK), rtol=0, atol=1e-6), path
        else:
            assert torch.equal(m.weight, base[path]), path
    assert rel_err(lora_out, logits(model, tokens)) < 1e-6


def test_merge_restores_requires_grad(model):
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_lora(model, RANK, ALPHA, ["q_proj"])
    merge_lora(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_target_and_argument_errors(model):
    with pytest.raises(ConfigError) as e:
        apply_lora(model, RANK, ALPHA, ["q_proj", "qkv_proj"])
    assert "'qkv_proj' names no nn.Linear" in str(e.value)
    assert "kv_a_proj_with_mqa" in str(e.value) and "f_b_proj" in str(e.value)  # lists the valid targets
    with pytest.raises(ConfigError, match="lora_rank"):
        apply_lora(model, 0, ALPHA, ["q_proj"])
    with pytest.raises(ConfigError, match="lora_alpha"):
        apply_lora(model, RANK, -1.0, ["q_proj"])
    apply_lora(model, RANK, ALPHA, ["self_attn.q_proj"])  # a path suffix works as in PEFT
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, RANK, ALPHA, ["o_proj"])


def test_load_errors(model, tiny_checkpoint, tmp_path):
    apply_lora(model, RANK, ALPHA, ["q_proj", "o_proj"])
    save_lora_adapter(model, tmp_path, tiny_checkpoint)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)

    def fresh():
        return KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)

    missing = dict(tensors)
    missing.pop(next(k for k in missing if "lora_B" in k))
    save_file(missing, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="missing adapter tensors"):
        load_lora_adapter(fresh(), tmp_path)
    reshaped = {k: (v[:2] if "lora_A" in k else v) for k, v in tensors.items()}
    save_file(reshaped, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="has shape"):
        load_lora_adapter(fresh(), tmp_path)
    stray = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    extra = {**tensors, stray: tensors[next(iter(tensors))].clone()}
    save_file(extra, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="does not adapt"):
        load_lora_adapter(fresh(), tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_lora_adapter(fresh(), tmp_path)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_lora_adapter(fresh(), tmp_path / "nowhere")


def test_peft_loads_our_adapter_on_transformers(model, tokens, tiny_checkpoint, tmp_path):
    import peft  # a dev dependency (pyproject [dev])
    import transformers
    apply_lora(model, RANK, ALPHA, TARGETS)
    randomize_adapters(model)
    save_lora_adapter(model, tmp_path / "ours", tiny_checkpoint)
    ours = logits(model, tokens)

    hf = transformers.KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_base = hf(tokens).logits
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "ours")
    with torch.no_grad():
        theirs = peft_model(tokens).logits
    n_adapted = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_adapted == len(model.lora_spec.modules)  # every adapter found its module (f_a_proj, shared MLP renamed)
    assert rel_err(ours, theirs) < 1e-4
    assert rel_err(ours, hf_base) > 1e-2

    # and an adapter saved by peft from transformers' model loads back into ours
    peft_model.save_pretrained(tmp_path / "theirs")
    fresh = KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)
    load_lora_adapter(fresh, tmp_path / "theirs")
    assert rel_err(ours, logits(fresh, tokens)) < 1e-6
