"""kimi_linear: Kimi Linear (KDA + MLA hybrid, MoE) in PyTorch + Triton."""

from kimi_linear.config import ModelConfig
from kimi_linear.errors import CheckpointError, ConfigError
from kimi_linear.models import KimiLinearForCausalLM, SequenceCache

__version__ = "0.1.0"

__all__ = ["KimiLinearForCausalLM", "ModelConfig", "SequenceCache", "ConfigError", "CheckpointError", "__version__"]
