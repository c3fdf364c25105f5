"""POST /v1/chat/completions: render the chat template, run the request, answer as OpenAI does.

Streaming: the first chunk of each choice carries `delta.role`, then one chunk per engine step with
the new text (one generated token per step), the last chunk of a choice has an empty delta and its
`finish_reason`; with `stream_options.include_usage` a final chunk with `choices: []` carries the
usage; then `data: [DONE]`. Errors after the stream started are sent as a `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from kimi_linear.errors import KimiLinearError, ValidationError
from kimi_linear.server.errors import error_body, status_of
from kimi_linear.server.admission import admitted_stream
from kimi_linear.server.protocol import ChatCompletionRequest
from kimi_linear.server.safe_text import SafeJSONResponse as JSONResponse
from kimi_linear.server.serving import ServingBase, now, random_id
from kimi_linear.server.sse import DONE, sse


class ServingChat(ServingBase):
    async def create(self, req: ChatCompletionRequest, raw: Request):
        from kimi_linear.loader.chat_template import apply_chat_template

        model = self.check_model(req.model)
        self.client.check_available()
        if self.tokenizer is None:
            raise ValidationError("this model has no tokenizer (no tiktoken.model), so chat is unavailable; "
                                  "use /v1/completions with token-id prompts", param="messages")
        params = self.sampling_params(req)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]

        def render_and_encode():  # in a worker thread: a long conversation must not block the event loop
            text = apply_chat_template(
                self.tokenizer, messages, chat_template=req.chat_template,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message, tools=req.tools,
                chat_template_kwargs=req.chat_template_kwargs)
            return text, self.tokenizer.encode(text)

        text, ids = await asyncio.to_thread(render_and_encode)
        processed = await self.process(ids, text, params, "messages")
        rid = random_id("chatcmpl")
        num_top = req.top_logprobs or 0
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = self._stream(rid, model, processed, raw, params.n, num_top, req.logprobs, include_usage)
            return admitted_stream(self.client, [rid], gen)
        final = None
        async for out in self.run(rid, processed, raw, stream=False):
            final = out
        if final is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        choices = []
        completion_tokens = 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "tool_calls": [], "reasoning_content": None},
                "logprobs": self.chat_logprobs(c.token_ids, c.logprobs, num_top) if req.logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            })
        P = len(final.prompt_token_ids)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": {"prompt_tokens": P, "completion_tokens": completion_tokens,
                      "total_tokens": P + completion_tokens},
        })

    async def _stream(self, rid: str, model: str, processed, raw: Request, n: int, num_top: int,
                      want_logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
        created = now()
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(choices: list, usage=None) -> str:
            return sse({**base, "choices": choices, "usage": usage})

        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        sent_text = [0] * n
        sent_tokens = [0] * n
        done = [False] * n
        final = None
        try:
            async for out in self.run(rid, processed, raw, stream=True):
                final = out
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    new_text = c.text[sent_text[i]:]
                    new_ids = c.token_ids[sent_tokens[i]:]
                    if new_ids or new_text:
                        lp = None
                        if want_logprobs and c.logprobs is not None:
                            lp = self.chat_logprobs(new_ids, c.logprobs[sent_tokens[i]:], num_top)
                        yield chunk([{"index": i, "delta": {"content": new_text}, "logprobs": lp,
                                      "finish_reason": None}])
                        sent_text[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                    if c.finish_reason is not None:
                        done[i] = True
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason,
                                      "stop_reason": c.stop_reason}])
        except KimiLinearError as e:
            yield sse(error_body(str(e), status_of(e), getattr(e, "param", None)))
            yield DONE
            return
        if include_usage and final is not None:
            P = len(final.prompt_token_ids)
            C = sum(len(c.token_ids) for c in final.outputs)
            yield chunk([], {"prompt_tokens": P, "completion_tokens": C, "total_tokens": P + C})
        yield DONE
