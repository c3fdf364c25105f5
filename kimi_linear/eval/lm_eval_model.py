"""The `kimi_linear` model of lm-evaluation-harness: offline evaluation through our `LLM` (no server).

    python -m kimi_linear.eval --model kimi_linear --model_args pretrained=DIR,dtype=bfloat16 --tasks hellaswag

`--model_args`: `pretrained` (the checkpoint folder), `max_length` (tokens a scored sequence may have;
default the engine's max_model_len - 1), `max_gen_toks` (default 256), `add_bos_token`, and any `EngineConfig`
field (`dtype`, `max_model_len`, `max_num_seqs`, ...); lm-eval's `--device` and `--batch_size` go to the
engine's `device` (a CUDA device without CUDA falls back to the CPU with a warning: lm-eval's CLI defaults to
cuda:0) and to how many requests are queued at once (the engine batches them itself).

- loglikelihood: each (context, continuation) runs as one prompt `context + continuation` (left-truncated
  to max_length) with `prompt_logprobs=1` and max_tokens=1; the score is the sum of the continuation
  tokens' prompt logprobs, greedy when each of them ranks first - the same numbers the server gives
  `local-completions` through echo + logprobs.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens, each scored as above.
- generate_until: SamplingParams from the task's generation kwargs (`until` plus the EOS text as stop
  strings, `max_gen_toks`, temperature 0 unless `do_sample`), context left-truncated to leave room.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from kimi_linear.errors import ValidationError
from kimi_linear.llm import LLM
from kimi_linear.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BATCH_SIZE = 64  # requests queued into the engine at once


@register_model("kimi_linear")
class KimiLinearLM(TemplateLM):
    def __init__(self, pretrained: str, max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 add_bos_token: bool = False, device: str | None = None, **engine_kwargs):
        super().__init__()
        if device is not None:
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes --device cuda:0 unless told otherwise; without a GPU run on the CPU
                logger.warning("--device %s: CUDA is not available, running on the CPU", device)
                device = "cpu"
            engine_kwargs["device"] = device
        self.llm = LLM(pretrained, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        if self.tokenizer is None:
            raise ValidationError(f"{pretrained} has no tokenizer (tiktoken.model): lm-eval tasks are text",
                                  param="pretrained")
        limit = self.llm.llm_engine.max_model_len - 1  # a scored prompt still gets its one sampled token
        self.max_length = min(int(max_length), limit) if max_length is not None else limit
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.batch_size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, int(max_batch_size))

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.llm.llm_engine.model_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        if (add_special_tokens or (add_special_tokens is None and self.add_bos_token)) \
                and self.tokenizer.bos_token_id is not None and ids[:1] != [self.tokenizer.bos_token_id]:
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from kimi_linear.loader.chat_template import DEFAULT_CHAT_TEMPLATE

        return None if not chat_template else (self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from kimi_linear.loader.chat_template import apply_chat_template

        return apply_chat_template(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    def _run(self, prompts: list[dict], params: list[SamplingParams], desc: str, disable_tqdm: bool) -> list:
        outs = []
        bar = tqdm(total=len(prompts), desc=desc, disable=disable_tqdm)
        for i in range(0, len(prompts), self.batch_size):
            outs += self.llm.generate(prompts[i:i + self.batch_size], params[i:i + self.batch_size], use_tqdm=False)
            bar.update(min(self.batch_size, len(prompts) - i))
        bar.close()
        return outs

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        prompts, spans = [], []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValidationError("lm-eval sent an empty continuation to score", param="continuation")
            # the engine samples one token after the prompt, so a prompt may have max_length tokens at most
            whole = (context_enc + continuation_enc)[-self.max_length:]
            n = min(len(continuation_enc), len(whole) - 1)
            prompts.append({"prompt_token_ids": whole})
            spans.append(n)
        params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)] * len(prompts)
        results = []
        for (req, _, _), prompt, n, out in zip(requests, prompts, spans,
                                                 self._run(prompts, params, "loglikelihood", disable_tqdm)):
            ids = prompt["prompt_token_ids"]
            entries = [out.prompt_logprobs[t][ids[t]] for t in range(len(ids) - n, len(ids))]
            answer = (sum(e.logprob for e in entries), all(e.rank == 1 for e in entries))
            results.append(answer)
            if req is not None:  # rolling windows have no request of their own
                self.cache_hook.add_partial("loglikelihood", req, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length,
                                               self.max_length - 1):
                windows.append((None, *make_disjoint_window(w)))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owners, scores):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.eos_token
        prompts, params = [], []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            stop = handle_stop_sequences(kw.pop("until", None), eos)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0 if not do_sample else 1.0))
            if not do_sample:
                temperature = 0.0
            sp = SamplingParams(max_tokens=max_gen, temperature=temperature, stop=stop,
                                top_p=float(kw.pop("top_p", 1.0)), top_k=int(kw.pop("top_k", 0)),
                                seed=kw.pop("seed", None))
            room = max(1, self.max_length - max_gen)
            prompts.append({"prompt_token_ids": self.tok_encode(context)[-room:]})
            params.append(sp)
        texts = []
        for req, out in zip(requests, self._run(prompts, params, "generate_until", disable_tqdm)):
            text = out.outputs[0].text
            texts.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts
