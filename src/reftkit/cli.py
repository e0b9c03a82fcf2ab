"""The `reftkit` command line.

Design decisions
- Thin: parse arguments, call the library, format the result. This is the only module that prints.
- Every subcommand is one entry of `COMMANDS` (name -> `Command(add_arguments, run, help)`); `run(args)`
  returns the exit code. New subcommands are added by adding an entry, nothing else.
- `--json` and `--debug` are accepted before and after the subcommand: they live on the top-level parser and
  are repeated on each subparser with `argparse.SUPPRESS` defaults, so a flag given in either place wins.
- stdout carries only results (a table or one JSON document); status lines, progress bars and logs go to stderr.
- Errors print one line `error: <message>` on stderr and exit 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple

from reftkit.errors import ConfigError, ReftkitError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEMO_PROMPTS = (
    "What is the capital of France?",
    "Give me three short tips for staying focused.",
    "Write a haiku about the sea.",
)


class Command(NamedTuple):
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


# ------------------------------------------------------------------------------------------------- helpers

def status(message: str) -> None:
    """A progress line on stderr (never on stdout, which is reserved for results)."""
    print(f"reftkit: {message}", file=sys.stderr, flush=True)


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def load_for_cli(name: str, args: argparse.Namespace, **kwargs: Any):
    """Load a model with a status line; quiets transformers' warnings unless --debug."""
    from transformers.utils import logging as transformers_logging

    from reftkit.models import load_model

    if not args.debug:
        transformers_logging.set_verbosity_error()
    status(f"loading {name}")
    return load_model(name, **kwargs)


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


def generate_replies(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 64,
                     chat: bool = True) -> list[str]:
    """Greedy replies to `prompts`, batched with left padding; applies the chat template when there is one."""
    import torch

    if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
        raise ConfigError(f"{type(model).__name__} cannot generate text; pass a causal language model "
                          "(for example smollm2-135m-instruct or tiny-llama)")
    use_chat = chat and bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not use_chat)
    finally:
        tokenizer.padding_side = previous_side
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [reply.strip() for reply in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _print_replies(args: argparse.Namespace, model_name: str, prompts: list[str], replies: list[str]) -> None:
    if args.json:
        emit_json({"model": model_name,
                   "outputs": [{"prompt": p, "reply": r} for p, r in zip(prompts, replies)]})
        return
    for index, (prompt, reply) in enumerate(zip(prompts, replies)):
        if index:
            print()
        print(f"> {prompt}")
        print(reply)


# ------------------------------------------------------------------------------------------------ commands

def _add_models_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    actions.add_parser("list", help="list the built-in models", parents=[_global_options(suppress=True)])


def _run_models(args: argparse.Namespace) -> int:
    from reftkit.models import list_models

    rows = list_models()
    if args.json:
        emit_json(rows)
        return 0
    name_width = max(len(row["name"]) for row in rows)
    print(f"{'NAME':<{name_width}}  {'KIND':<9}  {'INSTALLED':<9}  DESCRIPTION")
    for row in rows:
        installed = "yes" if row["installed"] else "no"
        print(f"{row['name']:<{name_width}}  {row['kind']:<9}  {installed:<9}  {row['description']}")
    return 0


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64)
    parser.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--adapter", metavar="DIR", help="a folder of saved ReFT interventions to apply")


def _run_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_cli(args.model, args)
    if args.adapter:
        model = attach_adapter(model, args.adapter)
    status(f"generating {len(args.prompt)} repl{'y' if len(args.prompt) == 1 else 'ies'}")
    replies = generate_replies(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                               chat=not args.no_chat)
    _print_replies(args, args.model, args.prompt, replies)
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=48)


def _run_demo(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_cli(args.model, args)
    prompts = list(DEMO_PROMPTS)
    status(f"generating {len(prompts)} replies")
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
    _print_replies(args, args.model, prompts, replies)
    return 0


COMMANDS: dict[str, Command] = {
    "models": Command(_add_models_arguments, _run_models, "built-in models (`models list`)"),
    "generate": Command(_add_generate_arguments, _run_generate, "greedy replies to prompts"),
    "demo": Command(_add_demo_arguments, _run_demo, "a short demonstration on the built-in model"),
}


# ---------------------------------------------------------------------------------------------------- main

def _global_options(*, suppress: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument("--json", action="store_true", default=default, help="print results as JSON")
    parser.add_argument("--debug", action="store_true", default=default, help="debug logs and tracebacks")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reftkit", parents=[_global_options(suppress=False)],
        description="Interventions on hidden representations and Representation Finetuning (ReFT).")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subcommands.add_parser(name, help=command.help, parents=[_global_options(suppress=True)])
        command.add_arguments(sub)
    return parser


def _configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("reftkit: %(message)s" if not debug else
                                           "%(levelname)s %(name)s: %(message)s"))
    library_logger = logging.getLogger("reftkit")
    library_logger.handlers = [handler]
    library_logger.setLevel(logging.DEBUG if debug else logging.INFO)


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
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    _configure_logging(args.debug)
    try:
        return COMMANDS[args.command].run(args)
    except ReftkitError as exc:
        return _fail(exc, args.debug, with_type=False)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`reftkit models list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # an unexpected failure still ends in one line, with the traceback under --debug
        return _fail(exc, args.debug, with_type=True)


if __name__ == "__main__":
    sys.exit(main())
