"""lm-evaluation-harness integration (the `[eval]` extra): importing `kimi_linear.eval.lm_eval_model`
registers the `kimi_linear` model with lm-eval; `python -m kimi_linear.eval ...` is lm-eval's CLI with
that model available. Nothing here is imported by the rest of the package."""
