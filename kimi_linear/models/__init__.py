"""The Kimi Linear model: decoder stack, its cache and forward context, explicit per-sequence cache and
weight init (checkpoint-making presets live in `kimi_linear.tools`). Code above the model (the engine)
imports these names from here."""

from kimi_linear.models.cache import ModelCache
from kimi_linear.models.context import ForwardContext
from kimi_linear.models.kimi_linear import KimiLinearForCausalLM
from kimi_linear.models.outputs import TrainOutput
from kimi_linear.models.sequence_cache import SequenceCache

__all__ = ["ForwardContext", "KimiLinearForCausalLM", "ModelCache", "SequenceCache", "TrainOutput"]
