"""Reading and writing checkpoint folders: weights (safetensors), tokenizer, chat template."""
