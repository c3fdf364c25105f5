"""End to end through `kimi-linear train` on the tiny preset (CPU, fp32): the loss goes down, `--resume`
continues exactly, the exported HF folder loads in transformers==5.23.0 (logits equal ours, fp32 1e-4) and in
`kimi-linear generate`, `--plot` draws a PNG, chat SFT with eval runs, LoRA trains only its adapters and the
merged export equals base + adapters.

One 20-step pre-training run (2 rows of 32 tokens per step, --save-every 10) is shared by the tests."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kimi_linear.cli.main import main
from kimi_linear.models import KimiLinearForCausalLM
from kimi_linear.train.metrics import read_metrics

COMMON = ["--seq-len", "32", "--batch-tokens", "64", "--dtype", "float32", "--device", "cpu", "--lr", "3e-3",
          "--warmup-steps", "3"]


def train(*argv) -> None:
    assert main(["train", *COMMON, *argv]) == 0


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, text_data):
    out = tmp_path_factory.mktemp("pretrain")
    train("--preset", "tiny", "--data", text_data, "--out", str(out), "--steps", "20", "--save-every", "10",
          "--optimizer", "muon")
    return out


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(out)) if "loss" in r}


def test_loss_goes_down_and_metrics_are_logged(pretrain_run):
    records = [r for r in read_metrics(str(pretrain_run)) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 21))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    r = records[-1]
    for key in ("grad_norm", "lr", "tokens_per_s", "moe_imbalance", "peak_memory_gb", "expert_load"):
        assert key in r, key
    assert r["tokens"] == 64 and r["tokens_per_s"] > 0 and r["moe_imbalance"] >= 1.0
    assert len(r["expert_load"]) == 3 and len(r["expert_load"][0]) == 16  # 3 MoE layers, 16 experts
    assert r["mfu"] is None  # no known peak on the CPU
    for d in ("step-000010", "step-000020"):
        assert os.path.isfile(pretrain_run / "checkpoints" / d / "DONE")
    assert os.path.isfile(pretrain_run / "hf" / "step-000010" / "model.safetensors.index.json")


def test_resume_gives_the_same_losses(pretrain_run, tmp_path, text_data):
    """Resuming at step 10 (fresh process state, another OUT) reproduces steps 11..20: equal on the CPU to a
    relative 1e-6 (in practice bit-identical)."""
    out = tmp_path / "resumed"
    train("--preset", "tiny", "--data", text_data, "--out", str(out), "--steps", "20", "--optimizer", "muon",
          "--resume", str(pretrain_run / "checkpoints" / "step-000010"))
    ref, got = losses(pretrain_run), losses(out)
    assert sorted(got) == list(range(11, 21))
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-6), s


def test_export_loads_in_transformers_with_equal_logits(pretrain_run):
    transformers = pytest.importorskip("transformers")
    path = str(pretrain_run / "hf" / "final")
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["dtype"] == "float32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    x = torch.randint(0, 768, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_export_runs_in_generate(pretrain_run, capsys):
    assert main(["generate", str(pretrain_run / "hf" / "final"), "--device", "cpu", "--prompt", "the red",
                 "--max-tokens", "5", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "[5 tokens" in captured.err and captured.out.strip()


def test_plot_writes_a_png(pretrain_run, capsys):
    assert main(["train", "--plot", str(pretrain_run)]) == 0
    with open(pretrain_run / "metrics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_chat_sft_with_eval(tiny_ckpt, chat_data, tmp_path):
    out = tmp_path / "sft"
    train("--model", tiny_ckpt, "--data", chat_data, "--eval-data", chat_data, "--eval-every", "4", "--out", str(out),
          "--steps", "8", "--lr", "2e-3", "--schedule", "cosine", "--grad-checkpointing")
    records = read_metrics(str(out))
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert all(r["loss_tokens"] > 0 for r in records if "loss" in r)
    # the fine-tuned export keeps the source's tokenizer, chat template and generation config
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        with open(os.path.join(tiny_ckpt, name), "rb") as a, open(out / "hf" / "final" / name, "rb") as b:
            assert a.read() == b.read(), name
    assert main(["generate", str(out / "hf" / "final"), "--device", "cpu", "--prompt", "count to 3",
                 "--max-tokens", "3", "--temperature", "0"]) == 0


def test_lora_trains_only_adapters_and_merges(tiny_ckpt, text_data, tmp_path):
    from safetensors.torch import load_file

    from kimi_linear.train.lora import apply_lora, load_lora_adapter, merge_lora

    out = tmp_path / "lora"
    train("--model", tiny_ckpt, "--data", text_data, "--out", str(out), "--steps", "4", "--lora-rank", "4",
          "--lora-alpha", "8", "--lora-targets", "q_proj,o_proj", "--merge-lora", "--lr", "1e-2")
    adapter = out / "adapter" / "final"
    cfg = json.load(open(adapter / "adapter_config.json"))
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["o_proj", "q_proj"]
    lora_tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for n, t in lora_tensors.items() if "lora_B" in n)  # B left zero-init: trained
    # only targeted weights differ between the merged export and the base checkpoint
    base = KimiLinearForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32, progress=False)
    merged = KimiLinearForCausalLM.from_pretrained(out / "hf" / "final", dtype=torch.float32, progress=False)
    base_sd, merged_sd = dict(base.named_parameters()), dict(merged.named_parameters())
    changed = {n for n in base_sd if not torch.equal(base_sd[n], merged_sd[n])}
    assert changed and all(n.endswith(("q_proj.weight", "o_proj.weight")) for n in changed), sorted(changed)
    # merged export == base + adapter (logits)
    apply_lora(base, 4, 8.0, ["q_proj", "o_proj"])
    load_lora_adapter(base, str(adapter))
    x = torch.randint(0, 768, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(x)
        merge_lora(base)
        torch.testing.assert_close(merged(x), ref, rtol=1e-5, atol=1e-5)
