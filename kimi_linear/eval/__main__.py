"""`python -m kimi_linear.eval ARGS`: lm-eval's command line (`lm_eval ARGS`) with the `kimi_linear` model
registered, e.g. `python -m kimi_linear.eval --model kimi_linear --model_args pretrained=DIR --tasks ...`.
(lm-eval discovers only its own models, so the plain `lm_eval` command does not know ours.)"""

from __future__ import annotations


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit('error: lm-eval is not installed: pip install -e ".[eval]"') from None
    import kimi_linear.eval.lm_eval_model  # noqa: F401 - registers "kimi_linear"

    cli_evaluate()


if __name__ == "__main__":
    main()
