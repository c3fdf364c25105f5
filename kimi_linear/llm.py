"""LLM: the offline batch API, shaped like vLLM's.

    llm = LLM("path/to/checkpoint", dtype="bfloat16", max_model_len=32768)
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8))
    outs[0].outputs[0].token_ids, outs[0].outputs[0].text
    outs = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))

    for out in llm.stream("Hello", SamplingParams(max_tokens=32)):   # cumulative outputs as they grow
        print(out.outputs[0].text)

`LLM(model, **engine_kwargs)` takes any `EngineConfig` field as a keyword (max_model_len, max_num_seqs,
dtype, enable_prefix_caching (on by default), ...; the defaults are EngineConfig's). `generate` validates every prompt before queueing any,
runs the engine until all are finished and returns one RequestOutput per prompt in input order. A
folder without a tokenizer still works with token-id prompts (outputs then carry token ids and empty
text). `chat` renders conversations with the chat template (the request's, else the `chat_template`
engine option, else the checkpoint's, else the Kimi default) and generates. `stream` / `chat_stream`
run one prompt and yield its cumulative RequestOutput after every step that changed it (the last one
finished); closing the generator early aborts the request.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Iterator

from kimi_linear.engine.config import EngineConfig
from kimi_linear.engine.llm_engine import LLMEngine
from kimi_linear.engine.outputs import RequestOutput
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_kwargs):
        """model: a checkpoint folder. engine_kwargs: EngineConfig fields (unknown names raise ConfigError)."""
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
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
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValidationError("messages must be a non-empty list of messages or of conversations",
                                  param="messages")
        conversations = [messages] if all(isinstance(m, dict) for m in messages) else list(messages)
        prompts = [self._chat_prompt(conv, chat_template, add_generation_prompt, continue_final_message, tools,
                                     chat_template_kwargs) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ------------------------------------------------------------------ streaming
    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Run one prompt (str or {"prompt_token_ids": [...]}), yielding its cumulative RequestOutput after
        every step that changed it; the last one is finished. Closing the generator aborts the request.
        One call at a time: the LLM is not re-entrant (do not interleave two streams or a stream and generate)."""
        engine = self.llm_engine
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        processed = engine.process_inputs(prompt, params)  # invalid: raises before anything is queued
        rid = str(next(self._counter))
        engine.add_processed(rid, processed, stream=True)
        finished = False
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
                if finished:
                    return
        finally:
            if not finished:  # closed early: abort, and step once more so the engine drops the request
                engine.abort_request(rid)
                while not finished and engine.has_unfinished_requests():
                    finished = any(o.request_id == rid and o.finished for o in engine.step())

    def chat_stream(self, messages: list[dict], sampling_params: SamplingParams | None = None,
                    chat_template: str | None = None, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, tools: list[dict] | None = None,
                    chat_template_kwargs: dict | None = None) -> Iterator[RequestOutput]:
        """`stream` over one conversation rendered with the chat template (as `chat`)."""
        yield from self.stream(self._chat_prompt(messages, chat_template, add_generation_prompt,
                                                 continue_final_message, tools, chat_template_kwargs),
                               sampling_params)

    def _chat_prompt(self, conversation, chat_template, add_generation_prompt, continue_final_message, tools,
                     chat_template_kwargs) -> dict:
        from kimi_linear.loader.chat_template import apply_chat_template

        tok = self.get_tokenizer()
        if tok is None:
            raise ValidationError("chat needs a tokenizer, and this model folder has none (no tiktoken.model); "
                                  "use generate() with {'prompt_token_ids': [...]}", param="messages")
        text = apply_chat_template(tok, conversation, chat_template=chat_template,
                                   add_generation_prompt=add_generation_prompt and not continue_final_message,
                                   continue_final_message=continue_final_message, tools=tools,
                                   chat_template_kwargs=chat_template_kwargs)
        return {"prompt_token_ids": tok.encode(text), "prompt": text}

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache's cached blocks and state snapshots (`enable_prefix_caching`, on by default)."""
        self.llm_engine.reset_prefix_cache()

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


def _init_signature() -> inspect.Signature:
    """LLM.__init__'s signature as help() and IDEs show it: model, then every EngineConfig field with its
    default (the defaults are written in EngineConfig only)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]
    for f in dataclasses.fields(EngineConfig):
        if f.name != "model":
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                            annotation=f.type))
    return inspect.Signature(params)


LLM.__init__.__signature__ = _init_signature()
