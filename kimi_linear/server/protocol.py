"""Request models of the OpenAI-compatible API (pydantic), with vLLM's extra sampling fields.

Each request model validates its own fields and turns itself into `SamplingParams`; every invalid
field becomes a 400 with the OpenAI error envelope naming the field (`param`). Unknown fields are
accepted and ignored, as vLLM and the OpenAI SDK's `extra_body` users expect.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from kimi_linear.engine.config import MAX_LOGPROBS_LIMIT
from kimi_linear.errors import ValidationError
from kimi_linear.sampling_params import SamplingParams, StructuredOutputsParams


OPENAI_COMPLETION_MAX_TOKENS = 16  # /v1/completions' max_tokens when the request leaves it out (OpenAI's default)
MAX_N = 128  # choices per request (OpenAI's limit): n = 10**9 made the engine build 10**9 sequences

# /v1/completions' prompt: a string, a list of strings, token ids or a list of token-id lists. Validated as
# "str or list" here and element by element in `CompletionRequest.prompts()`: pydantic's union of the four
# list types took seconds (holding the GIL) on a long token-id list. The schema documents the four forms.
_INT_ARRAY = {"type": "array", "items": {"type": "integer"}}
PromptInput = Annotated[Union[str, list], WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}}, _INT_ARRAY,
    {"type": "array", "items": _INT_ARRAY}]})]


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class StreamOptions(_Base):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaSpec(_Base):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _SamplingFields(_Base):
    """Sampling fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extras)."""

    model: str | None = None
    n: int = Field(1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's legacy structured-output fields, mapped onto structured_outputs (see structured())
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None

    def _max_tokens(self) -> int | None:
        raise NotImplementedError

    def _fallback_max_tokens(self) -> int | None:
        """max_tokens when neither the request nor the defaults set it (None = up to the context limit)."""
        return None

    def _num_logprobs(self, max_logprobs: int) -> int | None:
        raise NotImplementedError

    def _guided(self) -> dict[str, Any] | None:
        """The legacy guided_* fields as structured_outputs keys (None when none is set)."""
        given = {k: getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")
                 if getattr(self, f"guided_{k}") is not None}
        if not given:
            return None
        if len(given) > 1:
            raise ValidationError(f"give at most one of guided_json, guided_regex, guided_choice, guided_grammar; "
                                  f"got {', '.join('guided_' + k for k in given)}", param="guided_" + next(iter(given)))
        if self.structured_outputs is not None:
            raise ValidationError("give either structured_outputs or the legacy guided_* fields, not both",
                                  param="guided_" + next(iter(given)))
        return given

    def structured(self) -> StructuredOutputsParams | None:
        guided = self._guided()
        so_fields = guided if guided is not None else self.structured_outputs
        if so_fields is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValidationError("give either response_format or structured_outputs, not both",
                                  param="response_format")
        if guided is not None:
            so = StructuredOutputsParams(**guided)
            try:
                so.kind()
            except ValidationError as e:  # name the legacy field the client sent
                raise ValidationError(str(e).replace("structured_outputs.", "guided_"),
                                      param="guided_" + next(iter(guided))) from None
            return so
        if self.structured_outputs is not None:
            try:
                so = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValidationError(f"invalid structured_outputs: {e}", param="structured_outputs") from None
            so.kind()
            return so
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ValidationError("response_format of type json_schema needs json_schema.schema",
                                  param="response_format.json_schema")
        return StructuredOutputsParams(json=rf.json_schema.schema_)

    def to_sampling_params(self, defaults: dict[str, Any] | None = None,
                           max_logprobs: int = MAX_LOGPROBS_LIMIT) -> SamplingParams:
        """SamplingParams from the request; fields the client left out (None) come from `defaults`
        (generation_config.json, e.g. max_new_tokens -> max_tokens), then from SamplingParams' own defaults.
        `max_logprobs`: the server's limit (a larger top_logprobs is a 400 naming the field)."""
        if self.stream and self.prompt_logprobs is not None:
            raise ValidationError("prompt_logprobs is not available with stream=true", param="prompt_logprobs")
        stop = self.stop
        fields: dict[str, Any] = dict(
            n=self.n, seed=self.seed,
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, max_tokens=self._max_tokens(), min_tokens=self.min_tokens,
            logprobs=self._num_logprobs(max_logprobs), prompt_logprobs=self.prompt_logprobs,
            allowed_token_ids=self.allowed_token_ids, bad_words=list(self.bad_words or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=self.structured(),
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(self, name)
            if v is not None:
                fields[name] = v
        for name, v in (defaults or {}).items():
            if fields.get(name) is None:  # each field once: a default never collides with the request's
                fields[name] = v
        if fields["max_tokens"] is None:
            fields["max_tokens"] = self._fallback_max_tokens()
        if self.logit_bias is not None:
            try:
                fields["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValidationError("logit_bias keys must be token ids", param="logit_bias") from None
        return SamplingParams(**fields)


class ChatMessage(_Base):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("messages must not be empty")
        return v

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _num_logprobs(self, max_logprobs: int) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValidationError("top_logprobs needs logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= max_logprobs:
            raise ValidationError(f"top_logprobs must be in [0, {max_logprobs}] (the server's max_logprobs)",
                                  param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = OPENAI_COMPLETION_MAX_TOKENS
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def _max_tokens(self) -> int | None:
        # Left out, it is None here so generation_config's max_new_tokens can fill it; else OpenAI's 16.
        return self.max_tokens if "max_tokens" in self.model_fields_set else None

    def _fallback_max_tokens(self) -> int | None:
        return None if "max_tokens" in self.model_fields_set else OPENAI_COMPLETION_MAX_TOKENS

    def _num_logprobs(self, max_logprobs: int) -> int | None:
        return self.logprobs  # the engine checks it against max_logprobs (param "logprobs")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            out: list = [p]
        elif not p:
            raise ValidationError("prompt must not be empty", param="prompt")
        elif all(type(x) is int for x in p):
            out = [list(p)]
        elif all(isinstance(x, str) for x in p):
            out = list(p)
        elif all(isinstance(x, list) and all(type(t) is int for t in x) for x in p):
            out = [list(x) for x in p]
        else:
            raise ValidationError("prompt must be a string, a list of strings, a list of token ids or a "
                                  "list of token-id lists", param="prompt")
        for x in out:
            if (isinstance(x, str) and not x) or (isinstance(x, list) and not x):
                raise ValidationError("prompt must not be empty", param="prompt")
        return out


class TokenizeRequest(_Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[int]
