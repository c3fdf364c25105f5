"""The Kimi Linear model: decoder stack, explicit per-sequence cache, weight init (presets: `tools`)."""

from kimi_linear.models.kimi_linear import KimiLinearForCausalLM
from kimi_linear.models.sequence_cache import SequenceCache

__all__ = ["KimiLinearForCausalLM", "SequenceCache"]
