"""LLM: the offline batch API, shaped like vLLM's.

    llm = LLM("path/to/checkpoint", dtype="bfloat16", max_model_len=32768)
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8))
    outs[0].outputs[0].token_ids, outs[0].outputs[0].text
    outs = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))

`generate` validates every prompt before queueing any, runs the engine until all are finished and
returns one RequestOutput per prompt in input order. A folder without a tokenizer still works with
token-id prompts (outputs then carry token ids and empty text). `chat` renders conversations with
the chat template (the request's, else the checkpoint's, else the Kimi default) and generates.
"""

from __future__ import annotations

import itertools
from typing import Any

from kimi_linear.engine.config import EngineConfig
from kimi_linear.engine.llm_engine import LLMEngine
from kimi_linear.engine.outputs import RequestOutput
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, *, device: str | None = None, dtype: Any = None, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, seed: int = 0, load_format: str = "auto", **engine_kwargs):
        config = EngineConfig.from_kwargs(
            model, device=device, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager, seed=seed, load_format=load_format, **engine_kwargs)
        self.llm_engine = LLMEngine(config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        """The checkpoint's tokenizer, or None when the folder has none."""
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the defaults of the checkpoint's generation_config.json."""
        return self.llm_engine.default_sampling_params()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a str / {"prompt_token_ids": [...]} or a list of them. sampling_params: one for all
        prompts or a list with one per prompt (None = the checkpoint's defaults)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValidationError(f"prompts must be a list of prompts, got {type(prompts).__name__}", param="prompts")
        if prompts and all(isinstance(p, int) for p in prompts):
            raise ValidationError("token ids must be passed as {'prompt_token_ids': [...]}", param="prompts")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValidationError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts",
                                      param="sampling_params")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        engine = self.llm_engine
        processed = [engine.process_inputs(p, sp) for p, sp in zip(prompts, params)]  # all valid, or raise
        ids = [str(next(self._counter)) for _ in processed]
        results: dict[str, RequestOutput] = {}
        try:
            for rid, p in zip(ids, processed):
                engine.add_processed(rid, p)
            bar = _progress(len(ids), use_tqdm)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            engine.abort_request([i for i in ids if i not in results])
            raise
        return [results[i] for i in ids]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations.
        Returns one RequestOutput per conversation (a list of one for a single conversation)."""
        from kimi_linear.loader.chat_template import apply_chat_template

        tok = self.get_tokenizer()
        if tok is None:
            raise ValidationError("chat needs a tokenizer, and this model folder has none (no tiktoken.model); "
                                  "use generate() with {'prompt_token_ids': [...]}", param="messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValidationError("messages must be a non-empty list of messages or of conversations",
                                  param="messages")
        conversations = [messages] if all(isinstance(m, dict) for m in messages) else list(messages)
        prompts = []
        for conv in conversations:
            text = apply_chat_template(tok, conv, chat_template=chat_template,
                                       add_generation_prompt=add_generation_prompt and not continue_final_message,
                                       continue_final_message=continue_final_message, tools=tools,
                                       chat_template_kwargs=chat_template_kwargs)
            prompts.append({"prompt_token_ids": tok.encode(text), "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def shutdown(self) -> None:
        """Free the GPU memory held by the model, caches and CUDA graphs."""
        self.llm_engine.shutdown()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="Generating", unit="req")
