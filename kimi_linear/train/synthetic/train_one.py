"""One synthetic run: train one (task, mixer, length) model, measuring answer-token accuracy as it goes.

`RunSpec` is the run's whole description (JSON-able, so a worker process gets it as one argument). The run
trains on batches generated on the fly from `seed` and evaluates on `eval_sequences` held-out sequences
generated once from another seed (`seed + EVAL_SEED_OFFSET`, never a training batch); the accuracy is the
fraction of answer tokens (labels != -100) whose argmax prediction is right. It stops at `steps`, at
`wall_s` seconds (checked after every step), or once an evaluation reaches `target_acc`. Each evaluation is
handed to `sink` as soon as it is measured, so a run cut short keeps every point it measured.

Optimisation: AdamW (betas 0.9 / 0.98, weight decay 0.1 on matrices and embeddings, `train/optim.py`), a
linear warm-up of `warmup_steps` then a constant `lr`, gradient clipping at 1.0, bf16 autocast over fp32
master weights on CUDA (fp32 on the CPU). A batch is packed as one row (the training call's contract:
`cu_seqlens` at every sequence boundary, so sequences never see each other).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kimi_linear.train.synthetic.models import build_model
from kimi_linear.train.synthetic.tasks import IGNORE, make_task

EVAL_SEED_OFFSET = 1_000_003


@dataclass
class RunSpec:
    task: str
    mixer: str
    seq_len: int
    steps: int = 4000
    wall_s: float = 300.0
    batch_tokens: int = 16384  # sequences per step = max(batch_tokens // seq_len, min_batch)
    min_batch: int = 8
    lr: float = 2e-3
    warmup_steps: int = 50
    eval_every: int = 50
    eval_sequences: int = 128
    target_acc: float = 0.99
    seed: int = 0
    hidden_size: int = 256

    @property
    def batch(self) -> int:
        return max(self.batch_tokens // self.seq_len, self.min_batch)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.mixer}/{self.seq_len}"

    def to_dict(self) -> dict:
        return asdict(self)


def _pack(input_ids: torch.Tensor, labels: torch.Tensor, device: torch.device):
    B, T = input_ids.shape
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
    return input_ids.reshape(1, -1).to(device), labels.reshape(1, -1).to(device), cu


@torch.no_grad()
def answer_accuracy(model, eval_set, device: torch.device, autocast) -> float:
    """Fraction of answer tokens (labels != -100) predicted right by argmax, over the eval batches."""
    was_training = model.training
    model.eval()
    right = total = 0
    for input_ids, labels in eval_set:
        ids, lab, cu = _pack(input_ids, labels, device)
        with autocast():
            logits = model(ids, cu_seqlens=cu)
        mask = lab != IGNORE
        right += (logits[mask].argmax(-1) == lab[mask]).sum().item()
        total += mask.sum().item()
    model.train(was_training)
    return right / max(total, 1)


def make_eval_set(task, spec: RunSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(spec.seed + EVAL_SEED_OFFSET)
    batches, left = [], spec.eval_sequences
    while left > 0:
        b = min(spec.batch, left)
        batches.append(task.generate(b, spec.seq_len, gen))
        left -= b
    return batches


def train_one(spec: RunSpec, device: torch.device, sink: Callable[[dict], None]) -> dict:
    """Run `spec` on `device`; call `sink(record)` after every evaluation; return the last record."""
    from kimi_linear.train.optim import build_optimizer

    start = time.perf_counter()
    task = make_task(spec.task)
    torch.manual_seed(spec.seed)
    model = build_model(spec.mixer, task.vocab_size, device, seed=spec.seed, hidden_size=spec.hidden_size)
    optimizer = build_optimizer(model, "adamw", spec.lr, 0.1, (0.9, 0.98), 0.95)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(spec.warmup_steps, 1)))
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    eval_set = make_eval_set(task, spec)
    gen = torch.Generator().manual_seed(spec.seed)
    base = {"task": spec.task, "mixer": spec.mixer, "seq_len": spec.seq_len, "batch": spec.batch, "lr": spec.lr}
    losses: list[float] = []
    best = 0.0
    step = 0

    def evaluate(diverged: bool = False) -> dict:
        nonlocal best
        acc = answer_accuracy(model, eval_set, device, autocast)
        best = max(best, acc)
        event = "diverged" if diverged else ("solved" if acc >= spec.target_acc else "eval")
        rec = {**base, "step": step, "acc": acc, "best_acc": best,
               "loss": sum(losses) / len(losses) if losses else None,
               "elapsed_s": round(time.perf_counter() - start, 2), "event": event}
        losses.clear()
        sink(rec)
        return rec

    while True:
        input_ids, labels = task.generate(spec.batch, spec.seq_len, gen)
        ids, lab, cu = _pack(input_ids, labels, device)
        with autocast():
            out = model(ids, cu_seqlens=cu, labels=lab)
        loss = out.loss_sum / out.num_tokens.clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        value = loss.item()
        if not math.isfinite(value):
            return evaluate(diverged=True)
        losses.append(value)
        out_of_time = time.perf_counter() - start >= spec.wall_s
        if step % spec.eval_every == 0 or step >= spec.steps or out_of_time:
            record = evaluate()
            if record["event"] == "solved" or step >= spec.steps or out_of_time:
                return record
