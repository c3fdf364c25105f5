"""Reading and writing checkpoint folders (weights, later tokenizer and chat template)."""
