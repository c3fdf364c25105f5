"""FP8 checkpoints: `kimi-linear quantize` writes each layout, the loader reads it back, and the model's
logits equal those of the same weights dequantized into a bf16 checkpoint (1e-3 relative); bad scales,
missing scales and unsupported configs are load errors naming the tensor or the config field."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file, save_file

from kimi_linear.cli.main import main as cli_main
from kimi_linear.errors import CheckpointError, ConfigError
from kimi_linear.layers.linear import Fp8Linear
from kimi_linear.models.kimi_linear import KimiLinearForCausalLM
from kimi_linear.ops.quant import FP8, dequantize_fp8

PROMPTS = torch.randint(0, 1024, (3, 12), generator=torch.Generator().manual_seed(1))
LAYOUTS = {"channel": ["--format", "compressed-tensors"], "tensor": ["--format", "compressed-tensors", "--strategy",
           "tensor"], "block": ["--format", "block", "--block-size", "32"]}


@pytest.fixture(scope="module")
def fp8_checkpoints(tiny_checkpoint, tmp_path_factory):
    out = {}
    for name, flags in LAYOUTS.items():
        path = tmp_path_factory.mktemp(f"fp8-{name}")
        assert cli_main(["quantize", str(tiny_checkpoint), str(path), *flags]) == 0
        out[name] = path
    return out


def dequantized_copy(src, dst) -> None:
    """The FP8 checkpoint `src` with every FP8 weight dequantized to bf16 and no quantization_config."""
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    q = cfg.pop("quantization_config")
    block = tuple(q["weight_block_size"]) if q.get("quant_method") == "fp8" else None
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    for shard in set(index["weight_map"].values()):
        t = load_file(os.path.join(src, shard))
        out = {}
        for k, v in t.items():
            if k.endswith(("_scale", "_scale_inv")):
                continue
            if v.dtype == FP8:
                s = t.get(k + "_scale", t.get(k + "_scale_inv"))
                b = block if k + "_scale_inv" in t else None
                if s.numel() == 1:
                    s = s.reshape(1, 1).expand(v.shape[0], 1)
                v = dequantize_fp8(v, s, b, torch.bfloat16)
            out[k] = v
        save_file(out, os.path.join(dst, shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith(("_scale", "_scale_inv"))}
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


def logits(path) -> torch.Tensor:
    model = KimiLinearForCausalLM.from_pretrained(path, progress=False)
    with torch.no_grad():
        return model(PROMPTS).float()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_checkpoint_equals_its_dequantized_model(fp8_checkpoints, tmp_path, layout):
    path = fp8_checkpoints[layout]
    model = KimiLinearForCausalLM.from_pretrained(path, progress=False)
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear) and layer.block_sparse_moe.experts.is_fp8
    assert isinstance(model.model.layers[0].mlp.down_proj, Fp8Linear)
    mla = model.model.layers[3].self_attn
    assert mla.kv_b_proj.weight.dtype == torch.bfloat16  # quantized in the file, dequantized at load
    assert isinstance(mla.q_proj, Fp8Linear)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.block_sparse_moe.gate.weight.dtype == torch.bfloat16  # ignored by the quantizer
    expect_block = (32, 32) if layout == "block" else None
    assert layer.self_attn.q_proj.block == expect_block
    ref_dir = tmp_path / "dequantized"
    dequantized_copy(path, ref_dir)
    ref = logits(ref_dir)
    got = logits(path)
    assert rel_err(ref, got) <= 1e-3, rel_err(ref, got)


def test_fp8_checkpoint_is_close_to_bf16_and_smaller(fp8_checkpoints, tiny_checkpoint):
    ref = logits(tiny_checkpoint)
    for layout, path in fp8_checkpoints.items():
        got = logits(path)
        assert rel_err(ref, got) < 0.15, (layout, rel_err(ref, got))
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def _edit(src, dst, fn_tensors=None, fn_config=None):
    shutil.copytree(src, dst)
    if fn_config:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        fn_config(cfg)
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    if fn_tensors:
        index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
        for shard in set(index["weight_map"].values()):
            t = load_file(os.path.join(dst, shard))
            fn_tensors(t)
            save_file(t, os.path.join(dst, shard))
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in t or not k.endswith("scale")}
        json.dump(index, open(os.path.join(dst, "model.safetensors.index.json"), "w"))


NAME = "model.layers.1.self_attn.q_proj.weight_scale"


@pytest.mark.parametrize("case,match", [
    ("shape", f"tensor {NAME} has shape \\[63, 1\\], expected \\[64, 1\\]"),
    ("nan", f"malformed scale {NAME}.*not finite positive"),
    ("negative", f"malformed scale {NAME}.*not finite positive"),
    ("dtype", f"malformed scale {NAME}.*dtype"),
    ("missing", f"missing tensor {NAME}"),
    ("missing-dequantized", "missing tensor model.layers.3.self_attn.kv_b_proj.weight_scale"),
])
def test_bad_scales_are_load_errors(fp8_checkpoints, tmp_path, case, match):
    def edit(t):
        if case == "shape":
            t[NAME] = t[NAME][:-1]
        elif case == "nan":
            t[NAME][3] = float("nan")
        elif case == "negative":
            t[NAME][0] = -1.0
        elif case == "dtype":
            t[NAME] = t[NAME].to(FP8)
        elif case == "missing":
            del t[NAME]
        else:
            del t["model.layers.3.self_attn.kv_b_proj.weight_scale"]

    _edit(fp8_checkpoints["channel"], tmp_path / "bad", fn_tensors=edit)
    with pytest.raises(CheckpointError, match=match):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "bad", progress=False)


@pytest.mark.parametrize("edit,key", [
    (lambda q: q.update(quant_method="gptq"), "quantization_config.quant_method"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4), "weights.num_bits"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=128), "weights.strategy"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor"),
     "input_activations.strategy"),
    (lambda q: q.update(format="int-quantized"), "quantization_config.format"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "quantization_config.kv_cache_scheme"),
])
def test_unsupported_compressed_tensors_configs_name_the_field(fp8_checkpoints, tmp_path, edit, key):
    _edit(fp8_checkpoints["channel"], tmp_path / "bad", fn_config=lambda c: edit(c["quantization_config"]))
    with pytest.raises(ConfigError) as e:
        KimiLinearForCausalLM.from_pretrained(tmp_path / "bad", progress=False)
    assert key in e.value.key, (e.value.key, str(e.value))


@pytest.mark.parametrize("edit,key", [
    (lambda q: q.update(activation_scheme="static"), "quantization_config.activation_scheme"),
    (lambda q: q.update(weight_block_size=[128]), "quantization_config.weight_block_size"),
    (lambda q: q.update(weight_block_size=[48, 48]), "quantization_config.weight_block_size"),  # 48 does not divide I
    (lambda q: q.update(fmt="e5m2"), "quantization_config.fmt"),
])
def test_unsupported_block_configs_name_the_field(fp8_checkpoints, tmp_path, edit, key):
    _edit(fp8_checkpoints["block"], tmp_path / "bad", fn_config=lambda c: edit(c["quantization_config"]))
    with pytest.raises(ConfigError) as e:
        KimiLinearForCausalLM.from_pretrained(tmp_path / "bad", progress=False)
    assert e.value.key == key, (e.value.key, str(e.value))


def test_quantize_refuses_bad_arguments(tiny_checkpoint, fp8_checkpoints, tmp_path):
    from kimi_linear.tools.quantize import quantize_checkpoint

    with pytest.raises(ConfigError, match="already quantized"):
        quantize_checkpoint(str(fp8_checkpoints["channel"]), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="multiple of 16"):
        quantize_checkpoint(str(tiny_checkpoint), str(tmp_path / "y"), "block", block_size=24)
