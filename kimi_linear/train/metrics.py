"""Training metrics: FLOPs per token and MFU, peak memory, and the OUT/metrics.jsonl writer.

`forward_flops` owns the FLOP count of one forward pass over a causal sequence of N tokens (the training
count and `benchmarks/prefill.py` both call it):
- matmuls: 2 x the active matmul parameters per token: every weight matrix of the decoder (attention
  projections, router, the dense MLP, the routed experts counted k / E since each token visits k of E, the
  shared experts fully), the embedding excluded (a lookup); lm_head (vocab x hidden) only for the tokens
  whose logits are computed (every token in training, the last one in a prefill);
- MLA, per layer: QK^T and PV over the causal half, 2 x H x Dqk x N^2 / 2 + 2 x H x Dv x N^2 / 2 =
  H x (qk_head_dim + v_head_dim) x N^2 (the mean causal context taken as N / 2; an upper bound for packed
  documents shorter than a row);
- KDA, per layer and token: the recurrent form's three K x V products per head (q S, k S, k v^T):
  6 x H x K x V, plus the depthwise short conv over q, k, v: 2 x 3C x W (C = H x K, W taps).
FLOPs per trained token = 3 x forward FLOPs / N (backward ~ 2 x forward), `flops_per_token`.
MFU = tokens/s x FLOPs per token / (processes x peak FLOP/s of one device); the bf16 dense peak is known
for a few GPUs (`PEAK_TFLOPS`, by device name) and None elsewhere (the CPU), where MFU is not reported.
"""

from __future__ import annotations

import json
import os
import resource

import torch

# bf16 dense peak TFLOP/s by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0, "GH200": 989.0}


def active_matmul_params(config) -> float:
    """Weight-matrix parameters a token multiplies with (routed experts x k / E), embedding excluded."""
    from kimi_linear.models import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    total = 0.0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight" or p.dim() < 2 or "conv1d" in name or name.endswith(".A_log"):
            continue
        n = float(p.numel())
        if name.endswith(("experts.w13_weight", "experts.w2_weight")):
            n *= config.num_experts_per_token / config.num_experts
        total += n
    if config.tie_word_embeddings:  # lm_head shares the embedding but still multiplies
        total += config.vocab_size * config.hidden_size
    return total


def forward_flops_parts(config, num_tokens: int, num_logit_tokens: int | None = None) -> dict[str, float]:
    """Forward FLOPs of one causal sequence of `num_tokens` tokens by part (module docstring): "matmul",
    "mla_attention", "kda", and their "total". `num_logit_tokens`: the tokens that go through lm_head
    (default: all of them; a prefill computes the last token's logits only: 1)."""
    N = num_tokens
    lm_head = float(config.vocab_size * config.hidden_size)
    n_logits = N if num_logit_tokens is None else num_logit_tokens
    matmul = 2 * (active_matmul_params(config) - lm_head) * N + 2 * lm_head * n_logits
    mla = kda = 0.0
    for kind in config.layer_types:
        if kind == "mla":  # QK^T + PV over the causal half: 2 H (Dqk + Dv) N^2 / 2
            mla += config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * N * N
        else:
            H, K = config.kda_num_heads, config.kda_head_dim
            kda += (6 * H * K * K + 2 * 3 * config.kda_dim * config.conv_kernel_size) * N
    return {"matmul": matmul, "mla_attention": mla, "kda": kda, "total": matmul + mla + kda}


def forward_flops(config, num_tokens: int, num_logit_tokens: int | None = None) -> float:
    """Forward FLOPs of one causal sequence of `num_tokens` tokens (`forward_flops_parts`' total)."""
    return forward_flops_parts(config, num_tokens, num_logit_tokens)["total"]


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per token of a row of `seq_len` tokens."""
    return 3 * forward_flops(config, seq_len) / seq_len


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak FLOP/s of one device, when known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA), else the process's peak resident set, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class MetricsWriter:
    """Appends one JSON object per line to OUT/metrics.jsonl (rank 0 only; `append` keeps a resumed run's
    earlier lines)."""

    def __init__(self, out_dir: str, enabled: bool = True, append: bool = False):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            if not append:
                open(self.path, "w").close()

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps after `step` (a resumed run rewrites them)."""
        if self.enabled and os.path.isfile(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (a folder holding one, or the file)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
