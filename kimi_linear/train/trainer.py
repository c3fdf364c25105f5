"""The training loop: one optimizer step over this rank's packed rows, eval, checkpoints, exports, logs.

A step (`train_step`): the rows' loss-token counts are summed over the ranks first (G), then each row
runs forward (`model(input_ids, cu_seqlens=, labels=)`, under bf16 autocast when computing in bf16) and
backward on `loss_sum * W / G + aux_loss / R` (W ranks, R rows per rank; FSDP2 averages gradients over
the ranks, so the gradient is that of sum(token losses) / G over the global batch, plus the aux loss
averaged over all rows). Gradients are reduce-scattered only after the last row. Then the global grad
norm is clipped, the optimizer and the lr schedule step, and the MoE routers' correction biases move
by the step's all-reduced expert loads (`balance.py`). The logged loss is the global mean token loss.

The same code runs as one plain process (W = 1, no FSDP) or under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import torch
from torch.distributed.tensor import DTensor

from kimi_linear.config import ModelConfig, parse_dtype
from kimi_linear.train import checkpoint
from kimi_linear.train.args import TrainConfig
from kimi_linear.train.balance import ExpertLoad, imbalance
from kimi_linear.train.distributed import DistInfo, all_reduce_sum, set_gradient_sync, shard_model
from kimi_linear.train.export import export_hf
from kimi_linear.train.metrics import MetricsWriter, flops_per_token, peak_flops, peak_memory_gb
from kimi_linear.train.optim import build_optimizer
from kimi_linear.train.schedule import build_scheduler
from kimi_linear.train.setup import build_model, load_tokenizer_from, source_config_dict, tokenizer_dir

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        from kimi_linear.train.data import load_documents
        from kimi_linear.train.packing import EvalLoader, PackedLoader

        self.cfg, self.info = cfg, info
        torch.manual_seed(cfg.seed)
        self.config_dict = source_config_dict(cfg)
        self.config = ModelConfig.from_dict(self.config_dict)
        self.compute_dtype = self._compute_dtype()
        self.export_dtype = parse_dtype(cfg.dtype) if cfg.dtype != "auto" else self.config.torch_dtype
        if info.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        self.tokenizer_dir = tokenizer_dir(cfg, self.config, self.config_dict, info)
        tokenizer = load_tokenizer_from(self.tokenizer_dir)
        docs = load_documents(cfg.data, tokenizer, max_tokens=cfg.seq_len)
        eval_docs = load_documents(cfg.eval_data, tokenizer, max_tokens=cfg.seq_len) if cfg.eval_data else None

        self.model = build_model(cfg, self.config, info.device)
        if cfg.lora_rank:
            from kimi_linear.train.lora import apply_lora

            apply_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_list())
        if cfg.grad_checkpointing:
            self.model.gradient_checkpointing_enable(every=cfg.grad_checkpointing_every)
        if hasattr(self.model, "set_moe_aux_loss_coef"):
            self.model.set_moe_aux_loss_coef(cfg.aux_loss_coef)
        if info.distributed:
            shard_model(self.model, info.mesh)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                         cfg.muon_momentum)
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, cfg.resolved_warmup(), cfg.schedule, cfg.lr,
                                         cfg.resolved_min_lr(), cfg.decay_frac)
        self.rows = cfg.rows_per_rank(info.world_size)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        self.loader = PackedLoader(docs, cfg.seq_len, self.rows, info.rank, info.world_size, cfg.seed, True, pad)
        self.eval_loader = (EvalLoader(eval_docs, cfg.seq_len, self.rows, info.rank, info.world_size, pad)
                            if eval_docs else None)
        self.expert_load = ExpertLoad(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.step = 0
        if cfg.resume:
            self._resume(checkpoint.resolve(cfg.resume))
        self.metrics = MetricsWriter(cfg.out, info.is_main, append=bool(cfg.resume))
        if cfg.resume:
            self.metrics.truncate_after(self.step)
        self.flops_per_token = flops_per_token(self.config, cfg.seq_len)
        self.peak_flops = peak_flops(info.device)
        if info.is_main:
            with open(os.path.join(cfg.out, "train_config.json"), "w", encoding="utf-8") as f:
                json.dump({**vars(cfg), "world_size": info.world_size}, f, indent=2)

    # ---------------------------------------------------------------- setup helpers
    def _compute_dtype(self) -> torch.dtype:
        if self.cfg.dtype == "auto":
            return torch.bfloat16 if self.info.device.type == "cuda" else torch.float32
        return parse_dtype(self.cfg.dtype)

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.compute_dtype)

    def trainer_state(self) -> dict:
        """The rank-independent state a checkpoint keeps besides model and optimizer."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": json.dumps(vars(self.cfg))}

    def _resume(self, path: str) -> None:
        trainer_state, loader_state = checkpoint.load(path, self.model, self.optimizer, self.trainer_state(),
                                                      self.info.rank)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.loader.load_state_dict(loader_state)
        self.step = int(trainer_state["step"])
        logger.info("resumed from %s at step %d", path, self.step)

    # ---------------------------------------------------------------- one step
    def forward_row(self, row):
        dev = self.info.device
        with self.autocast():
            return self.model(row.input_ids.to(dev), cu_seqlens=row.cu_seqlens.to(dev), labels=row.labels.to(dev))

    def train_step(self, batch) -> dict:
        W, R = self.info.world_size, len(batch)
        (global_tokens,) = all_reduce_sum([float(sum(r.num_loss_tokens for r in batch))], self.info.device)
        scale = W / max(global_tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for i, row in enumerate(batch):
            set_gradient_sync(self.model, i == R - 1)
            out = self.forward_row(row)
            self.expert_load.accumulate()
            (out.loss_sum.float() * scale + out.aux_loss.float() / R).backward()
            loss_sum += out.loss_sum.detach().double()
            aux_sum += out.aux_loss.detach().double()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = self.expert_load.reduce()
        # a LoRA run leaves the base model (the routers' biases included) as it is
        self.expert_load.update_bias(counts, 0.0 if self.cfg.lora_rank else self.cfg.moe_bias_update_rate)
        total_loss, total_aux = all_reduce_sum([loss_sum.item(), aux_sum.item()], self.info.device)
        return {"loss": total_loss / max(global_tokens, 1.0), "aux_loss": total_aux / (R * W),
                "grad_norm": grad_norm.item(), "lr": lr, "loss_tokens": int(global_tokens), "expert_counts": counts}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the eval file (all ranks), no grad."""
        loss_sum = num = 0.0
        for batch in self.eval_loader:
            for row in batch:
                out = self.forward_row(row)
                loss_sum += out.loss_sum.item()
                num += out.num_tokens.item()
        loss_sum, num = all_reduce_sum([loss_sum, num], self.info.device)
        return loss_sum / max(num, 1.0)

    # ---------------------------------------------------------------- outputs
    def record(self, result: dict, seconds: float) -> dict:
        tokens = self.cfg.global_batch_tokens(self.info.world_size)
        tps = tokens / seconds
        counts = result.pop("expert_counts")
        per_layer = imbalance(counts)
        mfu = (tps * self.flops_per_token / (self.info.world_size * self.peak_flops)) if self.peak_flops else None
        return {"step": self.step, **result, "tokens": tokens, "tokens_per_s": tps, "step_s": seconds, "mfu": mfu,
                "moe_imbalance": max(per_layer) if per_layer else None, "moe_imbalance_per_layer": per_layer,
                "expert_load": [c.round().int().tolist() for c in counts],
                "peak_memory_gb": peak_memory_gb(self.info.device)}

    def save(self, final: bool = False) -> None:
        """Every --save-every steps a DCP checkpoint and an HF (or LoRA adapter) export to step-N; at the end
        (`final`) the export to `final` (the DCP checkpoint of the last step only when it is on schedule)."""
        cfg, info = self.cfg, self.info
        if not final:
            if not (cfg.save_every and self.step % cfg.save_every == 0):
                return
            checkpoint.save(checkpoint.step_dir(cfg.out, self.step), self.model, self.optimizer, self.trainer_state(),
                            self.loader.state_dict(), info.rank)
            if self.step == cfg.steps:
                return  # the final export follows
        name = "final" if final else f"step-{self.step:06d}"
        if cfg.lora_rank:
            from kimi_linear.train.lora import merge_lora, save_lora_adapter

            if info.is_main:
                save_lora_adapter(self.model, os.path.join(cfg.out, "adapter", name), cfg.model)
            if not (final and cfg.merge_lora):
                return
            merge_lora(self.model)
        export_hf(self.model, os.path.join(cfg.out, "hf", name), self.config_dict, self.export_dtype,
                  self.tokenizer_dir, cfg.model, info.distributed, info.is_main)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict | None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.info.is_main,
                   dynamic_ncols=True)
        last = None
        while self.step < cfg.steps:
            batch = next(self.loader)
            t0 = time.perf_counter()
            result = self.train_step(batch)
            if self.info.device.type == "cuda":
                torch.cuda.synchronize(self.info.device)
            self.step += 1
            last = self.record(result, time.perf_counter() - t0)
            if self.eval_loader is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                last["eval_loss"] = self.evaluate()
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or "eval_loss" in last:
                self.metrics.write(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            self.save()
        bar.close()
        if self.eval_loader is not None and not (last and "eval_loss" in last):
            eval_loss = self.evaluate()
            self.metrics.write({"step": self.step, "eval_loss": eval_loss})
        self.save(final=True)
        return last
