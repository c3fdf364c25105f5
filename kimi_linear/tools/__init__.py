"""Checkpoint-making tools, not used for inference: the named model shapes (`presets`), random
checkpoint folders from them (`create`, what `kimi-linear init` writes) and the small BPE tokenizers
those folders carry (`tokenizer`, trained on `bpe_corpus`)."""
