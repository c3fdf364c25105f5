"""Files shipped inside the package: demo/ is the trained demo model (`tools/demo_model.py`), the default model
of `generate`, `chat` and `serve` when none is given."""
