"""Engine flags shared by `serve`, `generate`, `chat` (offline) and `bench latency|throughput`, with
vLLM's names; and the default model used when no MODEL_DIR is given (the packaged demo model).

The flags are generated from the `EngineConfig` dataclass: one per field, named `--` + the field name
with `-` (`max_num_seqs` -> `--max-num-seqs`), its default the field's default, its help the field's
`metadata["help"]`; `metadata` may add `size` (accepts 32K / 1M), `choices`, `aliases` (`-tp`),
`negatable` (`--x` / `--no-x`) and `metavar`. Booleans are `store_true`. So a default lives in
EngineConfig only, and `engine_kwargs(args)` maps the flags back 1:1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "tiny"


def parse_size(value: str) -> int:
    """An integer with an optional k/K (x1000) or m/M suffix, as vLLM accepts ("32K", "1m")."""
    v = value.strip()
    mult = 1
    if v and v[-1] in "kK":
        mult, v = 1000, v[:-1]
    elif v and v[-1] in "mM":
        mult, v = 1000 ** 2, v[:-1]
    try:
        n = int(float(v) * mult) if "." in v else int(v) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return n


def engine_fields() -> list[dataclasses.Field]:
    """The EngineConfig fields that become flags (all but `model`, which is the positional / --model)."""
    from kimi_linear.engine.config import EngineConfig

    return [f for f in dataclasses.fields(EngineConfig) if f.name != "model"]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(f: dataclasses.Field):
    """argparse `type` from the field's annotation (a string under `from __future__ import annotations`)."""
    if f.metadata.get("size"):
        return parse_size
    base = str(f.type).replace(" ", "").replace("|None", "").replace("None|", "")
    return {"int": int, "float": float}.get(base, str)


def add_engine_args(p: argparse.ArgumentParser, model_optional: bool = True) -> None:
    """One flag per EngineConfig field (`--` + the field name with `-`), default and help from the field."""
    g = p.add_argument_group("model and engine")
    if model_optional:
        g.add_argument("model", nargs="?", default=None,
                       help="checkpoint folder (default: the built-in demo model, trained on the King James Bible)")
    else:
        g.add_argument("model", nargs="?", default=None, help="checkpoint folder")
    g.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the checkpoint folder, as an option (same as the positional)")
    p.set_defaults(model_required=not model_optional)
    for f in engine_fields():
        meta = f.metadata
        names = [flag_of(f.name), *meta.get("aliases", ())]
        help_text = meta.get("help", "")
        if f.default is not None and f.default is not False and "default" not in help_text:
            help_text += f" (default: {f.default})"
        kw = dict(dest=f.name, default=f.default, help=help_text)
        if meta.get("negatable"):
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif str(f.type) == "bool":
            g.add_argument(*names, action="store_true", **kw)
        else:
            g.add_argument(*names, type=_flag_type(f), choices=meta.get("choices"), metavar=meta.get("metavar"), **kw)


def resolve_model(model: str | None) -> str:
    """The given folder, or the default: the packaged demo model (`tools/demo_model.default_model_dir`), and
    while the package holds none, a random tiny checkpoint written once to the cache dir."""
    if model is not None:
        return model
    from kimi_linear.tools.demo_model import default_model_dir

    demo = default_model_dir()
    if demo is not None:
        return demo
    from kimi_linear.tools.create import create_checkpoint

    cache = os.environ.get("KIMI_LINEAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kimi_linear")
    path = os.path.join(cache, f"default-{DEFAULT_PRESET}")
    if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        logger.info("no model given: writing the built-in %s demo model to %s", DEFAULT_PRESET, path)
        tmp = path + f".tmp{os.getpid()}"
        create_checkpoint(tmp, DEFAULT_PRESET, seed=0, progress=False)
        os.makedirs(cache, exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; use its folder
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_arg(args: argparse.Namespace) -> str | None:
    """The model folder from the positional or --model (giving both, different, is an error)."""
    pos, opt = getattr(args, "model", None), getattr(args, "model_option", None)
    if pos is not None and opt is not None and pos != opt:
        from kimi_linear.errors import ConfigError

        raise ConfigError("model", f"given twice, as {pos!r} and as --model {opt!r}")
    model = pos if pos is not None else opt
    if model is None and getattr(args, "model_required", False):
        from kimi_linear.errors import ConfigError

        raise ConfigError("model", "a checkpoint folder is required")
    return model


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments from the parsed flags (every field; the flags' defaults are the fields')."""
    return dict(model=resolve_model(model_arg(args)), **{f.name: getattr(args, f.name) for f in engine_fields()})
