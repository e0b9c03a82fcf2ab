"""What every `reftkit` command shares: the command record, status lines and JSON output, the model,
device and adapter options, the parser class whose errors are one line, and the switch for transformers' own output."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

from reftkit.errors import ConfigError, ReftkitError

DEFAULT_MODEL = "smollm2-135m-instruct"


class Command(NamedTuple):
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str
    loads_models: bool = True  # False: runs without transformers (and its output settings are not touched)




def status(message: str) -> None:
    """A progress line on stderr (never on stdout, which is reserved for results)."""
    print(f"reftkit: {message}", file=sys.stderr, flush=True)


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, for every command that loads a model (read by `load_for_cli`)."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="where the model runs: cpu, cuda, cuda:N, mps or auto (cuda when available, else cpu; "
                             "default %(default)s)")
    parser.add_argument("--dtype", default="float32", metavar="DTYPE",
                        help="dtype of the model's weights and activations: float32, bfloat16 (bf16), float16 (fp16) "
                             "or auto (the dtype in the model's config; default %(default)s)")


def load_for_cli(name: str, args: argparse.Namespace, **kwargs: Any):
    """Load a model with a status line (transformers' own output is handled by `main`, see `quiet_transformers`),
    on the command's `--device` in its `--dtype`."""
    from reftkit.models import load_model

    for option in ("device", "dtype"):
        if getattr(args, option, None) is not None:
            kwargs.setdefault(option, getattr(args, option))
    status(f"loading {name}")
    return load_model(name, **kwargs)


def check_adapter_for_cli(adapter_dir: str, model_name: str | None) -> str:
    """Before any model is loaded, for `--adapter DIR`: the folder is a complete, readable ReFT adapter, and the
    model fits its recorded widths (read from the model's config.json where that is cheap). Returns the model to
    load: `model_name`, or the base model the adapter records when `model_name` is None."""
    from reftkit.adapters import base_source, check_base_config, read_adapter
    from reftkit.errors import ModelNotFoundError

    info = read_adapter(adapter_dir)
    if info["kind"] == "intervenable":
        raise ConfigError(f"{adapter_dir} holds interventions saved by IntervenableModel.save; --adapter takes a "
                          "ReFT adapter folder written by ReftModel.save_pretrained")
    if model_name is None:
        model_name = base_source(info)
        if model_name is None:
            raise ConfigError(f"the adapter in {adapter_dir} does not record its base model (it was saved by an "
                              "older reftkit or by pyreft); pass --model with the model it was trained on")
        if Path(model_name).is_absolute() and not Path(model_name).exists():
            raise ModelNotFoundError(f"the adapter in {adapter_dir} was trained on {model_name}, which does not exist "
                                     "on this machine; pass --model with that model's folder")
        status(f"using the adapter's base model {model_name}")
    from reftkit.models import peek_config

    check_base_config(info, peek_config(model_name), model_name)
    return model_name


def attach_adapter(model: Any, adapter_dir: str) -> Any:
    """Hook for `--adapter DIR`: wrap the model with saved ReFT interventions from `adapter_dir`."""
    if not Path(adapter_dir).is_dir():
        raise ConfigError(f"adapter folder {adapter_dir!r} does not exist; pass a folder written by "
                          "ReftModel.save_pretrained")
    try:
        from reftkit.reft.model import ReftModel
    except ModuleNotFoundError as exc:
        if exc.name not in ("reftkit.reft", "reftkit.reft.model"):
            raise
        raise ReftkitError("--adapter needs reftkit.reft.model, which this reftkit install does not include; "
                           "upgrade reftkit or run without --adapter") from exc
    return ReftModel.from_pretrained(model, adapter_dir)


def print_replies(args: argparse.Namespace, model_name: str, prompts: list[str], replies: list[str]) -> None:
    if args.json:
        emit_json({"model": model_name,
                   "outputs": [{"prompt": p, "reply": r} for p, r in zip(prompts, replies)]})
        return
    for index, (prompt, reply) in enumerate(zip(prompts, replies)):
        if index:
            print()
        print(f"> {prompt}")
        print(reply)




MODEL_HELP = ("a built-in name (see `reftkit models list`), a Hugging Face folder, a .gguf file or a Hugging Face Hub "
              "id org/name[@revision] (default %(default)s)")
BASE_MODEL_HELP = ("a built-in name (see `reftkit models list`), a Hugging Face folder, a .gguf file or a Hugging Face "
                   f"Hub id org/name[@revision] (default: the base model that --adapter records, else {DEFAULT_MODEL})")


class UsageError(Exception):
    """A command line that the parser rejects; `main` prints it as one `error:` line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse prints the usage and `prog: error: ...` and exits; here an error is one line that names the
    `--help` to read. Subparsers are made of the same class."""

    def error(self, message: str):
        raise UsageError(f"{' '.join(message.split())} (see '{self.prog} --help')")



def global_options(*, suppress: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument("--json", action="store_true", default=default, help="print results as one JSON document")
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="show transformers' own output: loading progress bars, load reports, warnings")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="debug logs and tracebacks (implies --verbose)")
    return parser



@contextlib.contextmanager
def quiet_transformers(quiet: bool = True):
    """While the block runs, transformers' progress bars ("Loading weights", "Writing model shards") and its
    logs (the coloured load report, warnings) are off when `quiet`; its previous settings come back afterwards."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    if quiet:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if transformers_logging.is_progress_bar_enabled() != bars:
            (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()
