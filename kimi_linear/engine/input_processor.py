"""InputProcessor: validate one prompt with its SamplingParams into a `ProcessedPrompt`, before queueing.

Every user mistake raises ValidationError naming the field: an empty prompt, a token id out of the
vocabulary, prompt + max_tokens beyond max_model_len (`ContextLengthError`, which carries the numbers so
the server can word it as OpenAI does), more logprobs than max_logprobs, a text prompt / stop strings /
bad_words without a tokenizer, invalid sampling fields, an invalid structured-output constraint
(compiled here, so an invalid schema fails this request alone, before it is queued).

Thread safety: the server calls this from its event-loop thread while the engine thread steps. It
reads only immutable engine facts (tokenizer, vocabulary, max_model_len) and the thread-safe grammar
cache (`StructuredOutputs`). It never mutates the caller's SamplingParams: when the engine needs a
derived field (`bad_words_token_ids`), the ProcessedPrompt holds a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kimi_linear.engine.config import MAX_LOGPROBS_LIMIT
from kimi_linear.engine.request import stop_ids
from kimi_linear.engine.structured_output import StructuredOutputs
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams


class ContextLengthError(ValidationError):
    """The prompt (plus max_tokens) does not fit max_model_len. `param` is "max_tokens" when the prompt
    alone fits, else "prompt"."""

    def __init__(self, message: str, param: str, num_prompt_tokens: int, max_tokens: int | None,
                 max_model_len: int):
        super().__init__(message, param=param)
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens, or up to max_model_len
    grammar: Any = None  # the compiled structured-output grammar (params.structured_outputs), if any


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, structured: StructuredOutputs,
                 model_name: str = "the model folder", eos_token_ids=frozenset(),
                 max_logprobs: int = MAX_LOGPROBS_LIMIT):
        self.tokenizer = tokenizer
        self.max_logprobs = max_logprobs
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.structured = structured
        self.model_name = model_name

    def process(self, prompt, params: SamplingParams) -> ProcessedPrompt:
        """Validate one prompt (str, {"prompt_token_ids": [...]} or {"prompt": str}) with its params."""
        if not isinstance(params, SamplingParams):
            raise ValidationError(f"sampling_params must be a SamplingParams, got {type(params).__name__}",
                                  param="sampling_params")
        text, ids = self._prompt(prompt)
        params.validate(self.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and n > self.max_logprobs:
                raise ValidationError(f"{name} = {n} exceeds max_logprobs ({self.max_logprobs})", param=name)
        P, M, mt = len(ids), self.max_model_len, params.max_tokens
        if P >= M:
            raise ContextLengthError(f"the prompt has {P} tokens, which leaves no room for output within "
                                     f"max_model_len {M}", "prompt", P, mt, M)
        if mt is not None and P + mt > M:
            raise ContextLengthError(f"the prompt ({P} tokens) plus max_tokens ({mt}) exceeds max_model_len ({M})",
                                     "max_tokens", P, mt, M)
        max_tokens = params.max_tokens if params.max_tokens is not None else M - P
        if params.min_tokens and params.allowed_token_ids is not None:
            if set(params.allowed_token_ids) <= stop_ids(params, self.eos_token_ids):
                raise ValidationError("allowed_token_ids holds only stop / EOS tokens, which min_tokens bans: no "
                                      "token could be sampled", param="allowed_token_ids")
        params = self._derived(params)
        grammar = None
        if params.structured_outputs is not None:
            if params.min_tokens:
                raise ValidationError("min_tokens cannot be combined with structured_outputs (the grammar may "
                                      "allow only EOS before min_tokens)", param="min_tokens")
            grammar = self.structured.compile(params.structured_outputs)
        return ProcessedPrompt(text, ids, params, max_tokens, grammar)

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        text, ids = None, None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
            elif "prompt" in prompt:
                text = prompt["prompt"]
            else:
                raise ValidationError("a prompt dict needs 'prompt_token_ids' or 'prompt'", param="prompt")
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise ValidationError(f"a prompt must be a string or a dict with 'prompt_token_ids', got "
                                  f"{type(prompt).__name__}", param="prompt")
        if ids is None:
            if not isinstance(text, str):
                raise ValidationError("'prompt' must be a string", param="prompt")
            if self.tokenizer is None:
                raise ValidationError(f"text prompts need a tokenizer, and {self.model_name} has none "
                                      f"(no tiktoken.model); pass {{'prompt_token_ids': [...]}}", param="prompt")
            ids = self.tokenizer.encode(text)
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValidationError("prompt_token_ids must be a list of integers", param="prompt_token_ids")
        ids = list(ids)
        if not ids:
            raise ValidationError("the prompt is empty", param="prompt")
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise ValidationError(f"prompt_token_ids[{i}] = {t} is out of the vocabulary (size "
                                      f"{self.vocab_size})", param="prompt_token_ids")
        return text, ids

    def _derived(self, params: SamplingParams) -> SamplingParams:
        """Check the fields that need the tokenizer; tokenize bad_words into a copy of `params`."""
        has_text = self.tokenizer is not None and params.detokenize
        if params.stop and not has_text:
            why = "detokenize=False" if self.tokenizer is not None else "this model folder has no tokenizer"
            raise ValidationError(f"stop strings need detokenization, but {why}; use stop_token_ids",
                                  param="stop")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValidationError("bad_words need a tokenizer, and this model folder has none",
                                      param="bad_words")
            params = params.clone()
            params.update_from_tokenizer(self.tokenizer)
        for word in params.bad_words_token_ids or ():
            if not word or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in word):
                raise ValidationError(f"bad_words: token ids {word} are not in the vocabulary (size "
                                      f"{self.vocab_size})", param="bad_words")
        return params
