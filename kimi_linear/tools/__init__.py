"""Checkpoint-making tools, not used for inference: the named model shapes (`presets`), random
checkpoint folders from them (`create`, what `kimi-linear init` writes) and the small BPE tokenizers
those folders carry (`tokenizer`: prefixes of the demo tokenizer's ranks)."""
