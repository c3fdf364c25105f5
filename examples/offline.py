"""Greedy generation with the bare model and an explicit cache: python examples/offline.py MODEL_DIR."""

import sys

import torch

from kimi_linear import KimiLinearForCausalLM, SequenceCache

path = sys.argv[1] if len(sys.argv) > 1 else "./tiny-kimi"
model = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.float32)
prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
cache = SequenceCache(model.config, batch_size=1)
with torch.inference_mode():
    logits = model(prompt, cache)
    out = []
    for _ in range(16):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt.item())
        logits = model(nxt, cache)
print("prompt ids:", prompt[0].tolist())
print("generated ids:", out)
