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
    from reftkit.chat import generate_replies

    replies = generate_replies(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                               chat=not args.no_chat)
    _print_replies(args, args.model, args.prompt, replies)
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="examples/caps.yaml", help="training recipe (default examples/caps.yaml)")
    parser.add_argument("--heldout", help="JSONL of held-out prompts (default: caps_heldout.jsonl beside the data)")


def _run_demo(args: argparse.Namespace) -> int:
    from reftkit.reft.demo import run_demo

    if not args.debug:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
    status(f"training a LoReFT adapter from {args.config}")
    result = run_demo(args.config, args.heldout, progress=not args.json)
    if args.json:
        emit_json(result)
        return 0
    for row in result["replies"]:
        print(f"> {row['prompt']}")
        print(f"  base:    {_one_line(row['base'])}")
        print(f"  adapted: {_one_line(row['adapted'])}  [{'ok' if row['ok'] else 'miss'}]")
    print()
    print(f"all-caps replies on {len(result['replies'])} held-out prompts: base {result['base_success']:.0%}, "
          f"adapted {result['adapted_success']:.0%}")
    print(f"trainable parameters: {result['trainable_parameters']:,} of {result['total_parameters']:,} "
          f"({result['trainable_percent']:.4f}%); {result['steps']} steps in {result['train_seconds']:.0f} s, "
          f"final loss {result['final_loss']:.3f}")
    print(f"adapter saved in {result['adapter']}")
    return 0


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML training recipe (see examples/)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")


def _run_train(args: argparse.Namespace) -> int:
    from reftkit.reft.recipe import load_recipe, run_recipe

    cfg = load_recipe(args.config)
    if not args.debug:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
    status(f"training {cfg.get('reft', {}).get('method', 'loreft')} on {cfg['model']} -> {cfg['output_dir']}")
    metrics = run_recipe(cfg, resume=args.resume, progress=not args.json)
    if args.json:
        emit_json(metrics)
        return 0
    print(f"trained {metrics['steps']} steps in {metrics['train_seconds']:.1f} s "
          f"({metrics['examples_per_second']:.2f} examples/s); final loss {metrics['losses'][-1]:.4f}")
    if metrics["eval"]:
        print(f"eval loss {metrics['eval'][-1][1]:.4f}")
    print(f"trainable parameters: {metrics['trainable_parameters']:,} ({metrics['trainable_percent']:.4f}%)")
    print(f"adapter: {metrics['adapter']}")
    if metrics.get("loss_plot"):
        print(f"loss curve: {metrics['loss_plot']}")
    return 0


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    parser.add_argument("--adapter", metavar="DIR", help="a saved adapter (omit to evaluate the base model)")
    parser.add_argument("--data", required=True, help="JSONL/CSV rows (prompt/completion, text/label, ...)")
    parser.add_argument("--task", default="sft", choices=("sft", "classification", "dpo"))
    parser.add_argument("--num-labels", type=_positive_int, default=2)
    parser.add_argument("--label-names", help="comma-separated label names, for string labels (classification)")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--max-length", type=_positive_int, default=512)
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template to prompts")


def _run_eval(args: argparse.Namespace) -> int:
    from reftkit.reft.evaluate import evaluate_file

    kwargs = {"task": "sequence-classification", "num_labels": args.num_labels} if args.task == "classification" else {}
    model, tokenizer = load_for_cli(args.model, args, **kwargs)
    result = evaluate_file(model, tokenizer, args.data, task=args.task, adapter=args.adapter,
                           batch_size=args.batch_size, max_length=args.max_length, chat=not args.no_chat,
                           label_names=args.label_names.split(",") if args.label_names else None)
    if args.json:
        emit_json(result)
        return 0
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    parser.add_argument("--prompt", required=True, help="the factual prompt (no chat template is applied)")
    parser.add_argument("--subject", required=True, help="the subject, as it appears in the prompt")
    parser.add_argument("--target", help="the one-token answer (default: the model's greedy prediction)")
    parser.add_argument("--samples", type=_positive_int, default=5, help="noise samples (default 5)")
    parser.add_argument("--noise", type=float, default=3.0, help="noise std in embedding stds (default 3)")
    parser.add_argument("--window", type=_positive_int, default=10, help="layers restored together for MLP and "
                        "attention (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="trace", help="folder for the heatmaps (default ./trace)")
    parser.add_argument("--no-plots", action="store_true", help="do not write heatmaps")


def _run_trace(args: argparse.Namespace) -> int:
    from reftkit.analysis.tracing import causal_trace

    model, tokenizer = load_for_cli(args.model, args)
    status(f"tracing {args.subject!r} -> {args.target or '(greedy prediction)'!r} with {args.samples} noise samples")
    result = causal_trace(model, tokenizer, args.prompt, args.subject, args.target, samples=args.samples,
                          noise=args.noise, window=args.window, seed=args.seed, progress=not args.json)
    plots = [] if args.no_plots else [str(p) for p in result.save_plots(args.out)]
    if args.json:
        emit_json({**result.to_dict(), "plots": plots})
        return 0
    print(f"target {result.target!r}: clean p = {result.clean_prob:.4f}, corrupted p = {result.corrupted_prob:.4f} "
          f"({result.samples} samples, noise std {result.noise_std:.4f}, {result.seconds:.1f} s)")
    for component, grid in result.grids.items():
        layer, position = divmod(int(grid.argmax()), grid.shape[1])
        print(f"{component:<17} best restoration p = {float(grid.max()):.4f} at layer {layer}, "
              f"token {position} {result.tokens[position]!r}")
    for path in plots:
        print(f"wrote {path}")
    return 0


COMMANDS: dict[str, Command] = {
    "models": Command(_add_models_arguments, _run_models, "built-in models (`models list`)"),
    "generate": Command(_add_generate_arguments, _run_generate, "greedy replies to prompts"),
    "train": Command(_add_train_arguments, _run_train, "train a ReFT adapter from a YAML recipe"),
    "eval": Command(_add_eval_arguments, _run_eval, "loss / accuracy of a model or adapter on a data file"),
    "demo": Command(_add_demo_arguments, _run_demo, "train a LoReFT adapter on SmolLM2 and compare replies"),
    "trace": Command(_add_trace_arguments, _run_trace, "causal tracing of a factual prompt (heatmaps per component)"),
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
