"""POST /v1/completions: string, list of strings, token ids or list of token-id lists; echo; logprobs.

Each prompt is one engine request with n choices; choice index = prompt index * n + i (as OpenAI).
`echo` prepends the prompt (text, and with `logprobs` the prompt tokens' logprobs, the first being
null: lm-eval's log-likelihood requests depend on exactly this). With `prompt_logprobs` (vLLM extra; also
implied by echo + logprobs, as vLLM) each choice carries `prompt_logprobs` in vLLM's shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from fastapi import Request

from kimi_linear.errors import KimiLinearError, ValidationError
from kimi_linear.server.admission import admitted_stream
from kimi_linear.server.errors import error_body, status_of
from kimi_linear.server.protocol import CompletionRequest
from kimi_linear.server.safe_text import SafeJSONResponse as JSONResponse
from kimi_linear.server.serving import ServingBase, now, prompt_logprobs_json
from kimi_linear.server.sse import DONE, sse


class ServingCompletions(ServingBase):
    async def create(self, req: CompletionRequest, raw: Request):
        model = self.check_model(req.model)
        self.client.check_available()
        if req.suffix is not None:
            raise ValidationError("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise ValidationError("best_of other than n is not supported", param="best_of")
        rid = self.request_id(raw, "cmpl")
        params = self.sampling_params(req)
        if req.echo and req.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=max(req.logprobs, params.prompt_logprobs or 0))
        if req.echo and req.stream:
            raise ValidationError("echo is not supported with stream", param="echo")
        processed = []
        for ids, text in await asyncio.to_thread(self._encode_prompts, req):
            processed.append(await self.process(ids, text, params, "prompt"))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = self._stream(rid, model, processed, raw, params.n, req.logprobs, include_usage)
            return admitted_stream(self.client, [f"{rid}-{k}" for k in range(len(processed))], gen)
        finals = await asyncio.gather(*(self._final(f"{rid}-{k}", p, raw) for k, p in enumerate(processed)))
        if any(f is None for f in finals):
            return JSONResponse({}, status_code=499)
        choices = []
        prompt_tokens = completion_tokens = cached_tokens = 0
        for k, out in enumerate(finals):
            prompt_tokens += len(out.prompt_token_ids)
            cached_tokens += out.num_cached_tokens
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                text = c.text
                lp = None
                if req.echo:
                    ptext = out.prompt or ""
                    if req.logprobs is not None:
                        plp = self.completion_logprobs(out.prompt_token_ids, out.prompt_logprobs or
                                                       [None] * len(out.prompt_token_ids), req.logprobs, 0,
                                                       first_is_none=True)
                    text = ptext + text
                else:
                    ptext = ""
                if req.logprobs is not None:
                    lp = self.completion_logprobs(c.token_ids, c.logprobs or [], req.logprobs, len(ptext))
                    if req.echo:
                        lp = {key: plp[key] + lp[key] for key in lp}
                choices.append({"index": k * params.n + c.index, "text": text, "logprobs": lp,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs)})
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": now(), "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached_tokens}},
        })

    def _encode_prompts(self, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
        """(token ids, text) of each prompt; runs in a worker thread (long prompts must not block the loop)."""
        out = []
        for p in req.prompts():
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValidationError("this model has no tokenizer: send token-id prompts", param="prompt")
                out.append((self.tokenizer.encode(p), p))
            else:
                out.append((p, self.tokenizer.decode(p) if self.tokenizer is not None and req.echo else None))
        return out

    async def _final(self, rid: str, processed, raw: Request):
        last = None
        async for out in self.run(rid, processed, raw, stream=False):
            last = out
        return last

    async def _stream(self, rid: str, model: str, processed: list, raw: Request, n: int, num_logprobs: int | None,
                      include_usage: bool) -> AsyncIterator[str]:
        created = now()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, p):
            try:
                async for out in self.run(f"{rid}-{k}", p, raw, stream=True):
                    await queue.put((k, out))
            except BaseException as e:  # noqa: BLE001 - forwarded to the stream
                await queue.put((k, e))
            finally:
                await queue.put((k, None))

        tasks = [asyncio.ensure_future(pump(k, p)) for k, p in enumerate(processed)]
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()
        prompt_tokens = completion_tokens = cached_tokens = 0
        live = len(tasks)
        try:
            while live:
                k, out = await queue.get()
                if out is None:
                    live -= 1
                    continue
                if isinstance(out, BaseException):
                    if isinstance(out, KimiLinearError):
                        yield sse(error_body(str(out), status_of(out), getattr(out, "param", None)))
                        yield DONE
                        return
                    raise out
                for c in out.outputs:
                    idx = k * n + c.index
                    if idx in done:
                        continue
                    s0, t0 = sent_text.get(idx, 0), sent_tokens.get(idx, 0)
                    new_text, new_ids = c.text[s0:], c.token_ids[t0:]
                    if new_ids or new_text:
                        lp = None
                        if num_logprobs is not None:
                            lp = self.completion_logprobs(new_ids, (c.logprobs or [])[t0:], num_logprobs, s0)
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                   "choices": [{"index": idx, "text": new_text, "logprobs": lp,
                                                "finish_reason": None}], "usage": None})
                        sent_text[idx], sent_tokens[idx] = len(c.text), len(c.token_ids)
                    if c.finish_reason is not None:
                        done.add(idx)
                        completion_tokens += len(c.token_ids)
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                   "choices": [{"index": idx, "text": "", "logprobs": None,
                                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}],
                                   "usage": None})
                if out.finished:
                    prompt_tokens += len(out.prompt_token_ids)
                    cached_tokens += out.num_cached_tokens
        finally:
            for t in tasks:
                t.cancel()
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens,
                                 "prompt_tokens_details": {"cached_tokens": cached_tokens}}})
        yield DONE
