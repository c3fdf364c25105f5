"""kimi_linear: Kimi Linear (KDA + MLA hybrid, MoE) in PyTorch + Triton."""

from kimi_linear.config import ModelConfig
from kimi_linear.engine.outputs import CompletionOutput, RequestOutput
from kimi_linear.errors import CheckpointError, ConfigError, ValidationError
from kimi_linear.llm import LLM
from kimi_linear.models import KimiLinearForCausalLM, SequenceCache
from kimi_linear.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "KimiLinearForCausalLM", "ModelConfig",
           "SequenceCache", "ConfigError", "CheckpointError", "ValidationError", "__version__"]
