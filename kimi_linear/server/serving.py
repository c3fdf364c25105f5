"""What /v1/chat/completions and /v1/completions share: model-name check, prompt validation (by the
engine's input processor; a context overflow is reworded as OpenAI words it), driving a request through
the engine client (aborting it when the client leaves; logged when request logging is on), and turning
the engine's cumulative outputs into per-choice deltas and OpenAI logprob fields (and vLLM's
`prompt_logprobs`). Request ids: `<prefix>-<X-Request-Id>` when the client sent that header, else
`<prefix>-<random hex>`; an id still in flight is a 400.

The engine is used only through `LLMEngine`'s public interface (tokenizer, max_model_len, max_logprobs,
sampling_defaults, process_inputs).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from kimi_linear.engine.llm_engine import ContextLengthError
from kimi_linear.errors import NotFoundError, ValidationError
from kimi_linear.server.engine_client import AsyncEngineClient
from kimi_linear.server.errors import GenerationError

logger = logging.getLogger(__name__)

MAX_REQUEST_ID_LEN = 256  # longest X-Request-Id header accepted


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ServingBase:
    def __init__(self, client: AsyncEngineClient, served_model_names: list[str], log_requests: bool = False):
        self.client = client
        self.served_model_names = served_model_names
        self.log_requests = log_requests

    @property
    def engine(self):
        return self.client.engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.served_model_names:
            return self.served_model_names[0]
        raise NotFoundError(f"The model `{name}` does not exist. Served models: {', '.join(self.served_model_names)}")

    def request_id(self, raw: Request, prefix: str) -> str:
        """This request's id (see the module docstring); recorded on `raw.state` for the X-Request-Id header."""
        incoming = getattr(raw.state, "incoming_request_id", None)
        rid = f"{prefix}-{incoming}" if incoming else random_id(prefix)
        if incoming and (self.client.in_flight(rid) or self.client.in_flight(f"{rid}-0")):
            raise ValidationError(f"request id {incoming!r} (X-Request-Id) is already in use by a running request",
                                  param="X-Request-Id")
        raw.state.request_id = rid
        return rid

    def sampling_params(self, req):
        """The request's SamplingParams, with the checkpoint's defaults and the server's max_logprobs."""
        return req.to_sampling_params(self.engine.sampling_defaults, max_logprobs=self.engine.max_logprobs)

    async def process(self, prompt_ids: list[int], prompt_text: str | None, params, what: str):
        """Validate one prompt + params with the engine; context overflow gets OpenAI's message.
        Runs in a worker thread: compiling a grammar must not block the event loop."""
        try:
            return await asyncio.to_thread(self.engine.process_inputs,
                                           {"prompt_token_ids": prompt_ids, "prompt": prompt_text}, params)
        except ContextLengthError as e:
            M, P, mt = e.max_model_len, e.num_prompt_tokens, e.max_tokens
            raise ValidationError(
                f"This model's maximum context length is {M} tokens. However, you requested {P + (mt or 0)} tokens "
                f"({P} in the {what}, {mt or 0} in the completion). Please reduce the length of the {what} or "
                f"completion.", param="max_tokens" if P < M else what) from None

    async def run(self, request_id: str, processed, raw: Request, stream: bool) -> AsyncIterator:
        """The request's outputs; when the HTTP client disconnects, the request is aborted. A sequence the
        engine finished with "error" (non-finite logits) raises GenerationError (a 500, or an error event)."""
        if self.log_requests:
            logger.info("request %s: %d prompt tokens, %s", request_id, len(processed.prompt_token_ids),
                        processed.params)
        gen = self.client.generate(request_id, processed, stream=stream)
        if stream:
            async for out in gen:
                if out.finished:
                    self._log_finished(request_id, out)
                yield _checked(out)
            return
        # Non-streaming: watch the connection while waiting for the final output.
        task = asyncio.ensure_future(_last(gen))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    out = task.result()
                    if out is not None:
                        self._log_finished(request_id, out)
                    yield _checked(out)
                    return
                if await raw.is_disconnected():
                    task.cancel()
                    self.client.abort(request_id)
                    return
        finally:
            if not task.done():
                task.cancel()
                self.client.abort(request_id)

    def _log_finished(self, request_id: str, out) -> None:
        if self.log_requests:
            logger.info("request %s finished: %s, %d prompt + %d generated tokens", request_id,
                        ",".join(str(c.finish_reason) for c in out.outputs), len(out.prompt_token_ids),
                        sum(len(c.token_ids) for c in out.outputs))

    # ---------------------------------------------------------------- token strings
    def token_str(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return f"token_id:{token_id}"
        return tok.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            return list(f"token_id:{token_id}".encode())
        return list(tok.token_bytes(token_id))

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict] | None, num_top: int) -> dict | None:
        if logprobs is None:
            return None
        content = []
        for tid, entry in zip(token_ids, logprobs):
            lp = entry.get(tid)
            tops = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:num_top]
            content.append({
                "token": self.token_str(tid), "logprob": _finite(lp.logprob if lp else float("-inf")),
                "bytes": self.token_bytes(tid),
                "top_logprobs": [{"token": self.token_str(t), "logprob": _finite(v.logprob),
                                  "bytes": self.token_bytes(t)} for t, v in tops],
            })
        return {"content": content}

    def completion_logprobs(self, token_ids: list[int], logprobs: list, num_top: int, text_start: int,
                            first_is_none: bool = False) -> dict:
        """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = text_start
        for i, (tid, entry) in enumerate(zip(token_ids, logprobs)):
            s = self.token_str(tid)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if entry is None or (first_is_none and i == 0):
                token_lps.append(None)
                tops.append(None)
                continue
            lp = entry.get(tid)
            token_lps.append(_finite(lp.logprob) if lp else None)
            best = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:num_top]
            tops.append({self.token_str(t): _finite(v.logprob) for t, v in best} if num_top else {})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(prompt_logprobs: list | None) -> list | None:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token {"<id>": {"logprob", "rank",
    "decoded_token"}} holding the prompt token and the top-k (-inf clamped to -9999.0, as vLLM)."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(tid): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in entry.items()} for entry in prompt_logprobs]


def _checked(out):
    if out is not None and any(c.finish_reason == "error" for c in out.outputs):
        raise GenerationError("the model produced non-finite logits (NaN or inf) for this request; its output "
                              "is meaningless and was dropped")
    return out


def _finite(x: float) -> float:
    return max(x, -9999.0)


async def _last(gen: AsyncIterator):
    last = None
    async for out in gen:
        last = out
    return last


def now() -> int:
    return int(time.time())
