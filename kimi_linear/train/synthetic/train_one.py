"""One synthetic run: train one (task, mixer, length) model, measuring answer-token accuracy as it goes.

`RunSpec` is the run's whole description (JSON-able, so a worker process gets it as one argument). The run
trains on batches generated on the fly from `seed` and evaluates on `eval_sequences` held-out sequences
generated once from another seed (`seed + EVAL_SEED_OFFSET`, never a training batch); the accuracy is the
fraction of answer tokens (labels != -100) whose argmax prediction is right. It stops at `steps`, at
`wall_s` seconds (checked after every step), or once an evaluation reaches `target_acc`. Each evaluation is
handed to `sink` as soon as it is measured, so a run cut short keeps every point it measured.

Optimisation (`Trainer`): AdamW (betas 0.9 / 0.98, `weight_decay` on the decoder's matrices only: none on the
embedding and lm_head, whose rows of rarely drawn tokens it would otherwise shrink toward zero), a linear
warm-up of `warmup_steps` then a constant `lr`, gradient clipping at 1.0, bf16 autocast over fp32 master
weights on CUDA (fp32 on the CPU), weights from `models.build_model` (a training init: small logits at step 0).
A batch is packed as one row (the training call's contract: `cu_seqlens` at every sequence boundary, so
sequences never see each other).

Host-side cost per step is kept off the device's critical path: `Trainer.step` never syncs (the loss stays on
the device, summed; it is read, and checked finite, at each evaluation), and on CUDA the batches are generated
`PREFETCH` ahead by a data-loader worker process into pinned memory (Stack's generator is a Python loop over
the operations), then copied without blocking.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from kimi_linear.train.synthetic.models import build_model
from kimi_linear.train.synthetic.tasks import IGNORE, make_task

EVAL_SEED_OFFSET = 1_000_003
PREFETCH = 4  # batches generated ahead on CUDA


@dataclass
class RunSpec:
    task: str
    mixer: str
    seq_len: int
    steps: int = 4000
    wall_s: float = 300.0
    batch_tokens: int = 65536  # sequences per step = max(batch_tokens // seq_len, min_batch)
    min_batch: int = 8
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on the decoder's matrices (never the embedding or lm_head)
    eval_every: int = 100
    eval_sequences: int = 256
    target_acc: float = 0.99
    seed: int = 0
    hidden_size: int = 256
    share: float = 1.0  # this run's weight in its lane's time (worker.py), from --shares
    mqar_vocab: int | None = None  # MQAR's vocabulary (None: the task's default, 1024)
    mqar_pairs: int | None = None  # MQAR's key-value pairs per sequence (None: seq_len // 16)

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
    blocking = device.type != "cuda" or not input_ids.is_pinned()
    return (input_ids.reshape(1, -1).to(device, non_blocking=not blocking),
            labels.reshape(1, -1).to(device, non_blocking=not blocking), cu)


def _autocast(device: torch.device):
    return ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
            else contextlib.nullcontext)


@torch.no_grad()
def answer_accuracy(model, eval_set, device: torch.device, autocast) -> float:
    """Fraction of answer tokens (labels != -100) predicted right by argmax, over the eval batches."""
    was_training = model.training
    model.eval()
    right = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for input_ids, labels in eval_set:
        ids, lab, cu = _pack(input_ids, labels, device)
        with autocast():
            logits = model(ids, cu_seqlens=cu)
        mask = lab != IGNORE
        right += (logits[mask].argmax(-1) == lab[mask]).sum()
        total += int((labels != IGNORE).sum())  # counted on the host copy: no sync
    model.train(was_training)
    return right.item() / max(total, 1)


def make_eval_set(task, spec: RunSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(spec.seed + EVAL_SEED_OFFSET)
    batches, left = [], spec.eval_sequences
    while left > 0:
        b = min(spec.batch, left)
        batches.append(task.generate(b, spec.seq_len, gen))
        left -= b
    return batches


# --------------------------------------------------------------------------- the training batches


class _Batches(torch.utils.data.IterableDataset):
    """The run's endless batch stream: `task.generate(batch, seq_len, gen)` from one generator seeded `seed`."""

    def __init__(self, task, batch: int, seq_len: int, seed: int):
        self.task, self.batch, self.seq_len, self.seed = task, batch, seq_len, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.task.generate(self.batch, self.seq_len, gen)


def batch_stream(task, spec: RunSpec, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches (int64 [B, T] input_ids, labels, on the host), the same sequence on any device:
    on CUDA made `PREFETCH` ahead by one data-loader worker process (so in order) into pinned memory."""
    data = _Batches(task, spec.batch, spec.seq_len, spec.seed)
    if device.type != "cuda":
        return iter(data)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=1, prefetch_factor=PREFETCH,
                                         pin_memory=True, persistent_workers=False)
    return iter(loader)


# --------------------------------------------------------------------------- the step


class Trainer:
    """The model, optimizer and schedule of one run, and its training step (what the benchmark times)."""

    def __init__(self, spec: RunSpec, device: torch.device, vocab_size: int):
        from kimi_linear.train.optim import param_groups

        self.device = device
        torch.manual_seed(spec.seed)
        self.model = build_model(spec.mixer, vocab_size, device, seed=spec.seed, hidden_size=spec.hidden_size)
        groups = param_groups(self.model.named_parameters(), "adamw", spec.weight_decay)
        for g in groups:
            g.pop("use_muon"), g.pop("split")
            embeddings = [i for i, n in enumerate(g["names"]) if n in ("model.embed_tokens.weight", "lm_head.weight")]
            if embeddings and g["weight_decay"]:
                g["weight_decay_free"] = [g["params"][i] for i in embeddings]
                g["params"] = [p for i, p in enumerate(g["params"]) if i not in embeddings]
        free = [p for g in groups for p in g.pop("weight_decay_free", [])]
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups if g["params"]]
        groups.append({"params": free, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.98), eps=1e-8)
        warmup = max(spec.warmup_steps, 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = _autocast(device)

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a host batch [B, T]; returns the mean answer loss (a device scalar: no sync)."""
        ids, lab, cu = _pack(input_ids, labels, self.device)
        with self.autocast():
            out = self.model(ids, cu_seqlens=cu, labels=lab)
        loss = out.loss_sum / out.num_tokens.clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# --------------------------------------------------------------------------- the run


def train_one(spec: RunSpec, device: torch.device, sink: Callable[[dict], None]) -> dict:
    """Run `spec` on `device`; call `sink(record)` after every evaluation; return the last record."""
    start = time.perf_counter()
    task = make_task(spec.task, spec.mqar_vocab, spec.mqar_pairs)
    trainer = Trainer(spec, device, task.vocab_size)
    eval_set = make_eval_set(task, spec)
    batches = batch_stream(task, spec, device)
    base = {"task": spec.task, "mixer": spec.mixer, "seq_len": spec.seq_len, "batch": spec.batch, "lr": spec.lr,
            "vocab": task.vocab_size}
    if hasattr(task, "pairs"):  # MQAR: how many key-value pairs each sequence holds
        base["kv_pairs"] = task.pairs(spec.seq_len)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    num_losses = 0
    best = 0.0
    step = 0

    def evaluate() -> dict:
        nonlocal best, num_losses  # loss_sum is zeroed in place
        loss = loss_sum.item() / num_losses if num_losses else None
        diverged = loss is not None and not math.isfinite(loss)
        acc = answer_accuracy(trainer.model, eval_set, device, trainer.autocast)
        best = max(best, acc)
        event = "diverged" if diverged else ("solved" if acc >= spec.target_acc else "eval")
        rec = {**base, "step": step, "acc": acc, "best_acc": best, "loss": None if diverged else loss,
               "elapsed_s": round(time.perf_counter() - start, 2), "event": event}
        loss_sum.zero_()
        num_losses = 0
        sink(rec)
        return rec

    while True:
        loss_sum += trainer.step(*next(batches))
        num_losses += 1
        step += 1
        out_of_time = time.perf_counter() - start >= spec.wall_s
        if step % spec.eval_every == 0 or step >= spec.steps or out_of_time:
            record = evaluate()
            if record["event"] in ("solved", "diverged") or step >= spec.steps or out_of_time:
                return record
