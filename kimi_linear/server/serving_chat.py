"""POST /v1/chat/completions: render the chat template, run the request, answer as OpenAI does.

Streaming: the first chunk of each choice carries `delta.role`, then one chunk per engine step with
the new text (one generated token per step), the last chunk of a choice has an empty delta and its
`finish_reason`; with `stream_options.include_usage` a final chunk with `choices: []` carries the
usage; then `data: [DONE]`. Errors after the stream started are sent as a `data: {"error": ...}` event.

Tool calls (`tool_calls.py` decides the mode): when the output is parsed, each choice's text goes
through the parser's streamer, so content deltas never carry a marker, a call's first delta carries
its index, id, type and name and the next ones its argument text; a step whose text the parser holds
back sends no chunk (its logprobs come with the next one). Non-streaming answers parse the whole text.
Either way `finish_reason` is "tool_calls" when a call was made and the output ended normally.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request

from kimi_linear.errors import KimiLinearError, ValidationError
from kimi_linear.server.admission import admitted_stream
from kimi_linear.server.errors import error_body, status_of
from kimi_linear.server.protocol import ChatCompletionRequest
from kimi_linear.server.safe_text import SafeJSONResponse as JSONResponse
from kimi_linear.server.serving import ServingBase, now, prompt_logprobs_json
from kimi_linear.server.sse import DONE, sse
from kimi_linear.server.tool_calls import (ToolPlan, apply_plan, delta_tool_calls, finish_reason, message_tool_calls,
                                           plan_tools, reword_schema_error)


class ServingChat(ServingBase):
    def __init__(self, *args, tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_call_parser = tool_call_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self._tool_parsers: dict = {}  # parser name -> ToolParser over the engine's tokenizer

    async def create(self, req: ChatCompletionRequest, raw: Request):
        from kimi_linear.loader.chat_template import apply_chat_template

        model = self.check_model(req.model)
        self.client.check_available()
        if self.tokenizer is None:
            raise ValidationError("this model has no tokenizer (no tiktoken.model), so chat is unavailable; "
                                  "use /v1/completions with token-id prompts", param="messages")
        params = self.sampling_params(req)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, messages, self.tokenizer,
                          self.tool_call_parser, self.enable_auto_tool_choice, self._tool_parsers)
        strip = apply_plan(plan, params)

        def render_and_encode():  # in a worker thread: a long conversation must not block the event loop
            text = apply_chat_template(
                self.tokenizer, messages, chat_template=req.chat_template,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message, tools=req.tools,
                chat_template_kwargs=req.chat_template_kwargs)
            return text, self.tokenizer.encode(text)

        text, ids = await asyncio.to_thread(render_and_encode)
        try:
            processed = await self.process(ids, text, params, "messages")
        except ValidationError as e:
            raise reword_schema_error(e, plan) from None
        rid = self.request_id(raw, "chatcmpl")
        num_top = req.top_logprobs or 0
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = self._stream(rid, model, processed, raw, params.n, num_top, req.logprobs, include_usage, plan,
                               strip)
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
            content, tool_calls = c.text, []
            if plan.parses:
                parsed = plan.parser.extract(c.text, strip, plan.max_calls)
                tool_calls = message_tool_calls(plan, parsed.tool_calls)
                content = (parsed.content or None) if tool_calls else parsed.content
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": content, "tool_calls": tool_calls,
                            "reasoning_content": None},
                "logprobs": self.chat_logprobs(c.token_ids, c.logprobs, num_top) if req.logprobs else None,
                "finish_reason": finish_reason(c.finish_reason, bool(tool_calls)), "stop_reason": c.stop_reason,
            })
        P = len(final.prompt_token_ids)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": {"prompt_tokens": P, "completion_tokens": completion_tokens,
                      "total_tokens": P + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens}},
            "prompt_logprobs": prompt_logprobs_json(final.prompt_logprobs),
        })

    async def _stream(self, rid: str, model: str, processed, raw: Request, n: int, num_top: int,
                      want_logprobs: bool, include_usage: bool, plan: ToolPlan, strip: bool) -> AsyncIterator[str]:
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
        streamers = [plan.parser.streamer(strip, plan.max_calls) if plan.parses else None for _ in range(n)]
        called = [False] * n

        def delta_of(i: int, new_text: str, end: bool) -> dict | None:
            """The choice's delta for its new text (None: nothing to send yet)."""
            if streamers[i] is None:
                return {"content": new_text}
            d = streamers[i].feed(new_text)
            if end:
                d.extend(streamers[i].finish())
            delta: dict = {}
            if d.content:
                delta["content"] = d.content
            if d.tool_calls:
                called[i] = True
                delta["tool_calls"] = delta_tool_calls(plan, d)
            return delta or None

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
                    sent_text[i] = len(c.text)
                    end = c.finish_reason is not None
                    delta = delta_of(i, new_text, end) if new_ids or new_text or end else None
                    if delta is not None and (new_ids or delta.get("content") or delta.get("tool_calls")):
                        lp = None
                        if want_logprobs and c.logprobs is not None:
                            lp = self.chat_logprobs(new_ids, c.logprobs[sent_tokens[i]:], num_top)
                        yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}])
                        sent_tokens[i] = len(c.token_ids)
                    if end:
                        done[i] = True
                        yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                      "finish_reason": finish_reason(c.finish_reason, called[i]),
                                      "stop_reason": c.stop_reason}])
        except KimiLinearError as e:
            yield sse(error_body(str(e), status_of(e), getattr(e, "param", None)))
            yield DONE
            return
        if include_usage and final is not None:
            P = len(final.prompt_token_ids)
            C = sum(len(c.token_ids) for c in final.outputs)
            yield chunk([], {"prompt_tokens": P, "completion_tokens": C, "total_tokens": P + C,
                             "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens}})
        yield DONE
