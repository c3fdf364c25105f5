"""/tokenize, /detokenize and /tokenizer_info, as vLLM serves them (lm-eval's `tokenizer_backend=remote`
client reads exactly these).

- POST /tokenize {prompt | messages, add_special_tokens} -> {tokens, count, max_model_len}. Special-token
  strings in the text encode to their ids (lm-eval finds the EOS id by tokenizing the EOS string).
- POST /detokenize {tokens} -> {prompt}.
- GET /tokenizer_info -> the tokenizer's configuration, the way vLLM renders tokenizer_config.json: the
  special tokens as strings (`bos_token`, `eos_token`, `pad_token`, `unk_token`), `added_tokens_decoder`
  (id -> content), `model_max_length`, `tokenizer_class`, and the chat template chat requests use (the
  server's --chat-template, else the checkpoint's, else the Kimi default).
"""

from __future__ import annotations

from kimi_linear.errors import ValidationError
from kimi_linear.loader.chat_template import DEFAULT_CHAT_TEMPLATE
from kimi_linear.server.protocol import DetokenizeRequest, TokenizeRequest
from kimi_linear.server.serving import ServingBase

# What the checkpoints' tokenizer_config.json names the class (Moonshot's remote code); vLLM reports it.
TOKENIZER_CLASS = "TikTokenTokenizer"


class ServingTokenization(ServingBase):
    def _tokenizer(self, param: str):
        self.client.check_available()
        tok = self.tokenizer
        if tok is None:
            raise ValidationError("this model has no tokenizer (no tiktoken.model in its folder)", param=param)
        return tok

    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        tok = self._tokenizer("prompt")
        if (req.prompt is None) == (req.messages is None):
            raise ValidationError("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            from kimi_linear.loader.chat_template import apply_chat_template

            text = apply_chat_template(tok, [m.model_dump(exclude_none=True) for m in req.messages],
                                       add_generation_prompt=req.add_generation_prompt)
        else:
            text = req.prompt
        ids = tok.encode(text)  # add_special_tokens changes nothing: the Kimi tokenizer never prepends BOS
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        tok = self._tokenizer("tokens")
        V = tok.vocab_size
        for i, t in enumerate(req.tokens):
            if not 0 <= t < V:
                raise ValidationError(f"tokens[{i}] = {t} is out of the vocabulary (size {V})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    def tokenizer_info(self) -> dict:
        tok = self._tokenizer("model")
        info: dict = {
            "tokenizer_class": TOKENIZER_CLASS,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "added_tokens_decoder": {str(i): name for i, name in sorted(tok.id_to_special.items())},
            "model_max_length": self.engine.max_model_len,
            "vocab_size": tok.vocab_size,
        }
        info["chat_template"] = tok.chat_template or DEFAULT_CHAT_TEMPLATE  # the one chat requests use
        return info
