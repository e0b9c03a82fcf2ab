"""The `reftkit` command line.

Design decisions
- Thin: parse arguments, call the library, format the result. This is the only package that prints.
- Every subcommand is one module of this package (`common` holds what they share) and one entry of `COMMANDS`
  (name -> `Command(add_arguments, run, help, loads_models)`); `run(args)` returns the exit code. A new
  subcommand is a new module and an entry, nothing else. Every option
  has a help line, and every option with a value shows its default (`%(default)s`).
- `--json`, `--verbose` and `--debug` are accepted before and after the subcommand: they live on the top-level
  parser and are repeated on each subparser with `argparse.SUPPRESS` defaults, so a flag given in either place
  wins. `--device` and `--dtype` are options of the commands that load a model (`add_device_arguments`, read by
  `load_for_cli`), not global ones: `models list` and `adapters` load nothing.
- `--adapter DIR` is checked before any model is loaded (`check_adapter_for_cli`): the folder, its config and the
  safetensors header of its weights, then the widths it records against the model's config.json where that is
  cheap. Without `--model`, the adapter's recorded base model is loaded. `adapters inspect/list` read the same
  files without importing torch.
- stdout carries only results (a table or one JSON document); status lines, progress bars and logs go to stderr.
  A reader that closes stdout early (`reftkit models list | head -1`) ends the command quietly with status 0.
- transformers' own output (its "Loading weights" bars, load reports and warnings) is silenced for commands
  that load models, unless `--verbose` or `--debug`; its settings are restored when the command ends, so calling
  `main` in-process leaves them as they were. Commands that load nothing (`models list`) import neither torch
  nor transformers, so they answer at once.
- Errors print one line `error: <message>` on stderr and exit 2; `--debug` adds the traceback. Usage errors
  (unknown option, missing or malformed argument) are one such line too, naming the `--help` to read; `reftkit`
  without a command prints the help on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback

from reftkit.errors import ReftkitError
from reftkit.cli.common import Command, Parser, UsageError, global_options, quiet_transformers
from reftkit.cli.adapters import add_adapters_arguments, run_adapters
from reftkit.cli.eval import add_eval_arguments, run_eval
from reftkit.cli.generate import add_generate_arguments, run_generate
from reftkit.cli.models import add_models_arguments, run_models
from reftkit.cli.serve import add_serve_arguments, run_serve
from reftkit.cli.steer import add_steer_arguments, run_steer
from reftkit.cli.trace import add_trace_arguments, run_trace
from reftkit.cli.train import add_demo_arguments, add_train_arguments, run_demo, run_train


COMMANDS: dict[str, Command] = {
    "models": Command(add_models_arguments, run_models, "built-in models (`models list`)", loads_models=False),
    "generate": Command(add_generate_arguments, run_generate, "greedy replies to prompts"),
    "train": Command(add_train_arguments, run_train, "train a ReFT adapter from a YAML recipe"),
    "eval": Command(add_eval_arguments, run_eval, "loss / accuracy of a model or adapter on a data file"),
    "demo": Command(add_demo_arguments, run_demo, "train a LoReFT adapter on SmolLM2 and compare replies"),
    "trace": Command(add_trace_arguments, run_trace, "causal tracing of a factual prompt (heatmaps per component)"),
    "adapters": Command(add_adapters_arguments, run_adapters, "inspect saved adapters (`adapters inspect DIR`, "
                        "`adapters list DIR`)", loads_models=False),
    "serve": Command(add_serve_arguments, run_serve, "an OpenAI-compatible server for a model with adapters and "
                     "steering vectors"),
    "steer": Command(add_steer_arguments, run_steer, "steering vectors (`steer extract CONFIG`, `steer eval CONFIG`, "
                     "`steer inspect DIR`)", loads_models=False),
}


def package_version() -> str:
    """The installed distribution's version, or `reftkit.__version__` when running from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reftkit")
    except PackageNotFoundError:
        import reftkit

        return getattr(reftkit, "__version__", "unknown")


class _VersionAction(argparse.Action):
    """`--version`: like argparse's own, but the version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"reftkit {package_version()}")
        parser.exit(0)



def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="reftkit", parents=[global_options(suppress=False)],
        description="Interventions on hidden representations and Representation Finetuning (ReFT).")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subcommands.add_parser(name, help=command.help, parents=[global_options(suppress=True)])
        command.add_arguments(sub)
    return parser


@contextlib.contextmanager
def _library_logging(debug: bool):
    """While a command runs, the library's logs go to stderr as `reftkit: ...` lines (every record with --debug);
    the `reftkit` logger's handlers and level come back afterwards, so calling `main` in-process leaves no handler
    bound to a stream that may be closed later."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("reftkit: %(message)s" if not debug else
                                           "%(levelname)s %(name)s: %(message)s"))
    library_logger = logging.getLogger("reftkit")
    handlers, level = library_logger.handlers, library_logger.level
    library_logger.handlers = [handler]
    library_logger.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        yield
    finally:
        library_logger.handlers = handlers
        library_logger.setLevel(level)


def _fail(exc: BaseException, debug: bool, *, with_type: bool) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if with_type:
        message = f"{type(exc).__name__}: {message}"
    print(f"error: {message}", file=sys.stderr)
    return 2



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            where = f"reftkit {args.command}" if args.command else "reftkit"
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see '{where} --help')")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command = COMMANDS[args.command]
    try:
        with _library_logging(args.debug), (quiet_transformers(not (args.verbose or args.debug))
                                            if command.loads_models else contextlib.nullcontext()):
            code = command.run(args)
        sys.stdout.flush()  # a reader that closed stdout early shows up here, inside the handlers below
        return code
    except ReftkitError as exc:
        return _fail(exc, args.debug, with_type=False)
    except KeyboardInterrupt:  # one line; commands that can continue say how (`args.on_interrupt`)
        hint = getattr(args, "on_interrupt", None)
        print(f"reftkit: interrupted; {hint}" if hint else "reftkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`reftkit models list | head -1`): the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 0
    except Exception as exc:  # an unexpected failure still ends in one line, with the traceback under --debug
        return _fail(exc, args.debug, with_type=True)


if __name__ == "__main__":
    sys.exit(main())
