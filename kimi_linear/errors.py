"""Exception hierarchy of kimi_linear.

Every error a user can cause (a bad config key, a missing tensor, an invalid request field) is one
of these, with a message that names the offending thing. The server maps them to HTTP statuses:
ClientError -> 400, NotFoundError -> 404, EngineDeadError / OverloadedError -> 503, the rest -> 500.
`OpError` and its per-family subclasses are what the ops (`kimi_linear.ops`) raise for invalid arguments:
a caller's bug, never a user's request (500).
"""

from __future__ import annotations


class KimiLinearError(Exception):
    """Base class of every error raised on purpose by kimi_linear."""


class ConfigError(KimiLinearError, ValueError):
    """An invalid model or engine configuration. `key` names the offending config key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class CheckpointError(KimiLinearError):
    """A checkpoint folder that cannot be loaded: missing/unexpected/mis-shaped tensor or bad file."""

    def __init__(self, message: str, *, tensor: str | None = None, file: str | None = None):
        self.tensor = tensor
        self.file = file
        super().__init__(message)


class ClientError(KimiLinearError, ValueError):
    """A request that is invalid as sent (HTTP 400). `param` names the offending field."""

    status_code = 400
    error_type = "BadRequestError"

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        self.message = message
        super().__init__(message)


class ValidationError(ClientError):
    """An invalid sampling or request parameter."""


class NotFoundError(KimiLinearError):
    status_code = 404
    error_type = "NotFoundError"


class EngineDeadError(KimiLinearError):
    status_code = 503
    error_type = "ServiceUnavailableError"


class OverloadedError(KimiLinearError):
    status_code = 503
    error_type = "ServiceUnavailableError"


class OpError(KimiLinearError, ValueError):
    """Invalid arguments to an op of `kimi_linear.ops` (shape, dtype, option combination). The message
    starts with the op's name. One subclass per op family; each also is a ValueError."""


class KDAError(OpError):
    """Kimi Delta Attention ops (`ops.kda`: chunk_kda, fused_recurrent_kda and their naive forms)."""


class ConvError(OpError):
    """Causal short convolution ops (`ops.conv`)."""


class MLAError(OpError):
    """Multi-head latent attention ops (`ops.mla`: prefill, decode, paged latent cache I/O)."""


class MoEError(OpError):
    """Mixture-of-experts ops (`ops.moe`: router, experts)."""


class NormError(OpError):
    """Normalisation ops (`ops.norm`)."""


class QuantError(OpError):
    """FP8 quantization ops (`ops.quant`)."""


class DataError(KimiLinearError, ValueError):
    """Training data that cannot be used (`kimi_linear.train.data`): a bad jsonl line, an empty file, a document
    longer than the sequence length. `file` and `line` (1-based) locate it; the message starts with them."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None):
        self.file = file
        self.line = line
        self.problem = message
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + message)


class TrainConfigError(ConfigError):
    """An invalid `kimi-linear train` option; `key` is the flag (`--batch-tokens`), named first in the message."""

    def __init__(self, flag: str, message: str):
        self.key = flag
        KimiLinearError.__init__(self, f"{flag}: {message}")
