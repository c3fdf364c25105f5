"""`kimi-linear init`: complete HF folders, official names and dtypes, loadable by transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import rel_err
from safetensors import safe_open

from kimi_linear import KimiLinearForCausalLM
from kimi_linear.cli.main import main
from kimi_linear.config import ModelConfig
from kimi_linear.tools.create import create_checkpoint


def test_tiny_folder_is_complete_and_official(tmp_path):
    out = tmp_path / "tiny"
    assert main(["init", "--preset", "tiny", str(out), "--seed", "3"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "generation_config.json" in names
    assert "model.safetensors.index.json" in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    assert index["metadata"]["total_size"] > 0
    assert "model.layers.1.block_sparse_moe.experts.15.w2.weight" in wm
    assert "model.layers.0.mlp.gate_proj.weight" in wm
    assert "model.layers.3.self_attn.kv_a_proj_with_mqa.weight" in wm
    for shard in set(wm.values()):
        with safe_open(out / shard, "pt") as f:
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                want = "F32" if name.endswith((".A_log", ".dt_bias")) else "BF16"
                assert dtype == want, f"{name} stored as {dtype}"
    cfg = ModelConfig.from_pretrained(out)
    assert 0.5e6 < cfg.num_parameters() < 1.5e6
    assert set(cfg.layer_types) == {"kda", "mla"} and "moe" in cfg.mlp_types


def test_tiny_loads_in_transformers_with_same_logits(tiny_checkpoint):
    from transformers import KimiLinearForCausalLM as HF

    hf = HF.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ours = KimiLinearForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32, progress=False)
    ids = torch.randint(0, 1000, (2, 80))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert rel_err(ref, got) < 1e-4
    # well-scaled weights: logits far from uniform, activations finite through every layer
    assert ref.std() > 1.0


def test_seed_changes_weights_and_is_deterministic(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    create_checkpoint(a, "tiny", seed=1, progress=False)
    create_checkpoint(b, "tiny", seed=1, progress=False)
    create_checkpoint(c, "tiny", seed=2, progress=False)
    read = lambda p: safe_open(next(p.glob("model-*.safetensors")), "pt").get_tensor("lm_head.weight")  # noqa: E731
    assert torch.equal(read(a), read(b))
    assert not torch.equal(read(a), read(c))


@pytest.mark.parametrize("preset,experts", [("48b-a3b", 256), ("48b-a3b-e64", 64)])
def test_large_presets_default_to_config_only(tmp_path, preset, experts):
    out = tmp_path / preset
    assert main(["init", "--preset", preset, str(out)]) == 0
    assert not list(out.glob("*.safetensors"))
    cfg = ModelConfig.from_pretrained(out)
    assert cfg.num_experts == experts and cfg.hidden_size == 2304 and cfg.num_hidden_layers == 27


def test_multi_shard_follows_index_not_glob(tmp_path):
    out = tmp_path / "sharded"
    create_checkpoint(out, "tiny", seed=0, max_shard_bytes=300_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    # rename shards so that glob order is the reverse of the index order
    renames = {s: f"z{len(shards) - i:03d}.safetensors" for i, s in enumerate(shards)}
    for old, new in renames.items():
        (out / old).rename(out / new)
    index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    ref = KimiLinearForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32, progress=False)
    assert torch.isfinite(ref(torch.tensor([[1, 2, 3]]))).all()


def test_cli_entry_point_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kimi_linear", "init", "--preset", "tiny", str(tmp_path / "x"),
                        "--no-weights"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote tiny" in r.stdout


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["init", "--preset", "huge", str(tmp_path / "y")])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
