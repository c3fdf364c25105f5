"""Which modules of a KimiLinearForCausalLM run in FP8, and turning them into FP8 modules before allocation.

FP8-capable: every projection of the decoder layers (KDA, MLA, dense and shared MLPs: `nn.Linear` ->
`layers.linear.Fp8Linear`), the routed expert stacks (`Experts.to_fp8`) and lm_head. Kept in the model
dtype whatever the checkpoint holds (`KEEP_PLAIN`): MLA's kv_b_proj (the attention ops read it raw, to
absorb it into the query and the output), the routers and the embedding; a checkpoint that quantized them
is dequantized while loading (`loader/quant.py`). Norms, conv weights, A_log and dt_bias are never linear
weights and are never touched.

- `on_load_modules(model)`: what `--quantization fp8` quantizes (the decoder's projections and experts;
  lm_head and the routers stay as the checkpoint has them, as in vLLM's dynamic FP8);
- `apply_fp8(model, names, block)`: replace those modules on the meta-device model (`from_config` does it
  between the dtype pass and `materialize`, so no bf16 copy of them is ever allocated).
"""

from __future__ import annotations

import re

from torch import nn

from kimi_linear.layers.linear import Fp8Linear
from kimi_linear.layers.moe import Experts

KEEP_PLAIN = re.compile(r"(\.kv_b_proj|\.block_sparse_moe\.gate|embed_tokens)$")


def fp8_capable(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module of every module that can run in FP8 (nn.Linear projections, expert stacks)."""
    out = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, m in model.named_modules():
        if KEEP_PLAIN.search(name) or (tied and name == "lm_head"):
            continue
        if isinstance(m, Experts) or (isinstance(m, nn.Linear) and m.bias is None):
            out[name] = m
    return out


def on_load_modules(model: nn.Module) -> list[str]:
    """The modules `--quantization fp8` quantizes: the decoder layers' projections and expert stacks."""
    return [n for n in fp8_capable(model) if n.startswith("model.layers.")]


def apply_fp8(model: nn.Module, names, block: tuple[int, int] | None) -> None:
    """Turn the named modules into FP8 modules (weights float8_e4m3fn + fp32 scales, uninitialised, on the
    modules' device). Names must come from `fp8_capable`."""
    capable = fp8_capable(model)
    for name in names:
        m = capable[name]
        if isinstance(m, Experts):
            m.to_fp8(block)
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear(m.in_features, m.out_features, block, device=m.weight.device))
