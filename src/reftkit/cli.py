"""The `reftkit` command line.

Design decisions
- Thin: parse arguments, call the library, format the result. This is the only module that prints.
- Every subcommand is one entry of `COMMANDS` (name -> `Command(add_arguments, run, help, loads_models)`);
  `run(args)` returns the exit code. New subcommands are added by adding an entry, nothing else. Every option
  has a help line, and every option with a value shows its default (`%(default)s`).
- `--json`, `--verbose` and `--debug` are accepted before and after the subcommand: they live on the top-level
  parser and are repeated on each subparser with `argparse.SUPPRESS` defaults, so a flag given in either place
  wins. `--device` and `--dtype` are options of the commands that load a model (`_add_device_arguments`, read by
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
    loads_models: bool = True  # False: runs without transformers (and its output settings are not touched)


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


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
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

MODEL_HELP = ("a built-in name (see `reftkit models list`), a Hugging Face folder, a .gguf file or a Hugging Face Hub "
              "id org/name[@revision] (default %(default)s)")
BASE_MODEL_HELP = ("a built-in name (see `reftkit models list`), a Hugging Face folder, a .gguf file or a Hugging Face "
                   f"Hub id org/name[@revision] (default: the base model that --adapter records, else {DEFAULT_MODEL})")


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
    parser.add_argument("--model", help=BASE_MODEL_HELP)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (required); repeat for a batch")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N",
                        help="most tokens generated per reply, greedily (default %(default)s)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--adapter", metavar="DIR", help="a folder of saved ReFT interventions to apply")
    parser.add_argument("--steer", metavar="DIR", help="a steering-vector folder (written by `reftkit steer extract` "
                                                       "or SteeringVector.save) to apply while generating")
    parser.add_argument("--coefficient", type=float, metavar="C",
                        help="strength of the --steer vector, in its unit (default: 1.0 with --steer)")
    parser.add_argument("--scope", metavar="S",
                        help="tokens the --steer vector edits: all, prompt, generated, last_prompt_token_then_generated "
                             "or a positions string such as 'l1@all' (default: the vector's own scope)")
    parser.add_argument("--unit", choices=("raw", "mean_diff_norm", "hidden_norm"),
                        help="unit of --coefficient: raw, mean_diff_norm or hidden_norm (default: the vector's unit)")
    _add_device_arguments(parser)


def _steer_for_cli(args: argparse.Namespace):
    """`--steer DIR` and its options, read and checked before any model is loaded: the vector, or None."""
    if not args.steer:
        for option in ("coefficient", "scope", "unit"):
            if getattr(args, option) is not None:
                raise ConfigError(f"--{option} needs --steer DIR (see 'reftkit generate --help')")
        return None
    if args.adapter:
        raise ConfigError("--steer and --adapter cannot be combined yet; apply one of them")
    from reftkit.errors import PositionError
    from reftkit.steer.vector import SteeringVector, check_coefficient, resolve_scope

    vector = SteeringVector.load(args.steer)
    args.coefficient = check_coefficient(1.0 if args.coefficient is None else args.coefficient)
    if args.scope is not None:
        from reftkit.steer.apply import _as_positions

        try:
            resolve_scope(vector, _as_positions(args.scope))
        except PositionError as e:
            raise ConfigError(f"--scope {args.scope!r}: {e}") from None
    vector.raw_multipliers(args.coefficient, args.unit)
    return vector


def _check_steer_fits(vector, model_name: str) -> None:
    """Before loading: the vector's recorded hidden size and layer count against the model's config, where that
    is cheap to read (the full `check_model` runs once the model is loaded)."""
    from reftkit.errors import IncompatibleModelError
    from reftkit.models import peek_config

    config, hint = peek_config(model_name), vector.model_hint or {}
    if config is None:
        return
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    now = {"model_type": getattr(config, "model_type", None), "hidden_size": getattr(text_config, "hidden_size", None),
           "num_layers": getattr(text_config, "num_hidden_layers", None)}
    diffs = [f"{key.replace('_', ' ')} {hint[key]!r} vs {now[key]!r}" for key in now
             if hint.get(key) is not None and now[key] is not None and hint[key] != now[key]]
    if diffs:
        raise IncompatibleModelError(f"the --steer vector does not fit {model_name}: "
                                     f"{'; '.join(diffs)}")


def _steered_replies(model, tokenizer, vector, args: argparse.Namespace) -> list[str]:
    """Greedy replies (as `chat.generate_replies` makes them) with the vector applied at its scope."""
    import torch

    from reftkit.chat import left_padded
    from reftkit.steer.apply import _as_positions

    vector.check_model(model)
    device = next(model.parameters()).device
    batch = left_padded(tokenizer, args.prompt, not args.no_chat, device)
    pad = batch["input_ids"][0, 0].item() if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    scope = None if args.scope is None else _as_positions(args.scope)
    with vector.apply(model, args.coefficient, scope=scope, unit=args.unit) as steered, torch.no_grad():
        out = steered.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                               do_sample=False, pad_token_id=pad)
    T = batch["input_ids"].shape[1]
    return [tokenizer.decode(o[T:], skip_special_tokens=True).strip() for o in out]


def _run_generate(args: argparse.Namespace) -> int:
    vector = _steer_for_cli(args)
    model_name = check_adapter_for_cli(args.adapter, args.model) if args.adapter else (args.model or DEFAULT_MODEL)
    if vector is not None:
        _check_steer_fits(vector, model_name)
    model, tokenizer = load_for_cli(model_name, args)
    if args.adapter:
        model = attach_adapter(model, args.adapter)
    status(f"generating {len(args.prompt)} repl{'y' if len(args.prompt) == 1 else 'ies'}"
           + (f" steered by {args.steer} (coefficient {args.coefficient:g})" if vector is not None else ""))
    from reftkit.chat import generate_replies

    if vector is not None:
        replies = _steered_replies(model, tokenizer, vector, args)
    else:
        replies = generate_replies(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                                   chat=not args.no_chat)
    _print_replies(args, model_name, args.prompt, replies)
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training recipe (default: the caps.yaml shipped with reftkit)")
    parser.add_argument("--heldout", help="JSONL of held-out prompts (default: caps_heldout.jsonl beside the data)")
    parser.add_argument("--output-dir", default="runs/demo", help="run folder (default runs/demo)")
    _add_run_folder_arguments(parser)


def _add_run_folder_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in the output folder from its checkpoint")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in the output folder (the old one stays until the new one is complete)")


def _on_interrupt(command: str, output_dir: str, cfg: dict) -> str:
    """The line that tells how to continue a run that Ctrl-C stopped."""
    from reftkit.reft.recipe import find_checkpoint

    found = find_checkpoint(output_dir)
    if found is not None:
        folder, step = found
        return f"the checkpoint of step {step} is in {folder}; continue with: {command} --resume"
    save_every = (cfg.get("train") or {}).get("save_every") or 0
    if save_every:
        return f"no checkpoint was written yet (one every {save_every} steps); run {command} to start again"
    return "no checkpoint was written: set train.save_every in the recipe to make runs resumable with --resume"


def _run_demo(args: argparse.Namespace) -> int:
    import shlex

    from reftkit.reft.demo import demo_setup, run_demo

    cfg, _ = demo_setup(args.config, args.heldout, args.output_dir)
    status(f"training a LoReFT adapter from {args.config or 'the built-in caps.yaml'} -> {cfg['output_dir']}")
    try:
        result = run_demo(args.config, args.heldout, output_dir=args.output_dir, resume=args.resume,
                          overwrite=args.overwrite, progress=not args.json)
    except KeyboardInterrupt:
        command = "reftkit demo" + "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in
                                            (("--config", args.config), ("--heldout", args.heldout),
                                             ("--output-dir", args.output_dir)) if value)
        args.on_interrupt = _on_interrupt(command, cfg["output_dir"], cfg)
        raise
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
    parser.add_argument("config", help="a YAML training recipe (see examples/); its relative paths are relative to "
                                       "its folder")
    _add_run_folder_arguments(parser)
    parser.add_argument("--device", metavar="DEVICE", help="where to train: cpu, cuda, cuda:N, mps or auto (default: "
                        "the recipe's device, else cpu)")
    parser.add_argument("--dtype", metavar="DTYPE", help="dtype of the base model's weights: float32, bfloat16 (bf16), "
                        "float16 (fp16) or auto (default: the recipe's dtype, else float32)")


def _run_train(args: argparse.Namespace) -> int:
    import shlex

    from reftkit.reft.recipe import check_device_options, load_recipe, run_recipe

    cfg = load_recipe(args.config)
    for key in ("device", "dtype"):  # the command line wins over the recipe
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    check_device_options(cfg)
    status(f"training {cfg.get('reft', {}).get('method', 'loreft')} on {cfg['model']} -> {cfg['output_dir']}")
    try:
        metrics = run_recipe(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.json)
    except KeyboardInterrupt:
        args.on_interrupt = _on_interrupt(f"reftkit train {shlex.quote(args.config)}", cfg["output_dir"], cfg)
        raise
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
    parser.add_argument("--model", help=BASE_MODEL_HELP)
    parser.add_argument("--adapter", metavar="DIR", help="a saved adapter (omit to evaluate the base model)")
    parser.add_argument("--data", required=True, help="JSONL/CSV rows (prompt/completion, text/label, ...; required)")
    parser.add_argument("--task", default="sft", choices=("sft", "classification", "dpo"),
                        help="sft: completion loss; classification: loss and accuracy of a classification head; "
                             "dpo: preference loss and accuracy (default %(default)s)")
    parser.add_argument("--num-labels", type=_positive_int, default=2, metavar="N",
                        help="classes of the classification head (task classification; default %(default)s)")
    parser.add_argument("--label-names", help="comma-separated label names, for string labels (classification)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                        help="examples per forward (default %(default)s)")
    parser.add_argument("--max-length", type=_positive_int, default=512, metavar="N",
                        help="longest example in tokens; a longer one is an error (default %(default)s)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template to prompts")
    parser.add_argument("--behaviour", metavar="SPEC",
                        help="also generate a greedy reply to every prompt and score it with this check: all_caps, "
                             "answer (the row's 'answer' field), json, contains:TEXT or regex:PATTERN; rows need only "
                             "a 'prompt' (default: no generation)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N",
                        help="longest generated reply, with --behaviour (default %(default)s)")
    _add_device_arguments(parser)


def _run_eval(args: argparse.Namespace) -> int:
    from reftkit.behaviours import behaviour
    from reftkit.errors import DataError
    from reftkit.reft.data import TASK_FIELDS, read_rows

    model_name = check_adapter_for_cli(args.adapter, args.model) if args.adapter else (args.model or DEFAULT_MODEL)
    rows = read_rows(args.data)  # the data and the check are validated before the model loads
    check = behaviour(args.behaviour) if args.behaviour else None
    if check is not None:
        check.validate_rows(rows, args.data)
        if args.task != "sft":
            raise ConfigError(f"--behaviour scores generated replies to prompts; it applies to --task sft, not {args.task}")
    fields = TASK_FIELDS[args.task]
    scorable = bool(rows) and all(isinstance(row, dict) and all(f in row for f in fields) for row in rows)
    if check is None and not scorable:
        raise DataError(f"{args.data}: not every row has the fields {', '.join(fields)} that the {args.task} loss needs; "
                        "to score generated replies to prompts instead, pass --behaviour SPEC (e.g. all_caps)")
    from reftkit.reft.evaluate import evaluate_file, evaluate_generations

    kwargs = {"task": "sequence-classification", "num_labels": args.num_labels} if args.task == "classification" else {}
    model, tokenizer = load_for_cli(model_name, args, **kwargs)
    result: dict = {}
    if scorable:
        result.update(evaluate_file(model, tokenizer, args.data, task=args.task, adapter=args.adapter,
                                    batch_size=args.batch_size, max_length=args.max_length, chat=not args.no_chat,
                                    label_names=args.label_names.split(",") if args.label_names else None))
    if check is not None:
        status(f"generating {len(rows)} repl{'y' if len(rows) == 1 else 'ies'} and checking {check.spec}")
        generated = evaluate_generations(model, tokenizer, args.data, check, adapter=args.adapter,
                                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                         chat=not args.no_chat)
        result.update(generated)
    if args.json:
        emit_json(result)
        return 0
    for key, value in result.items():
        if key != "replies":
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--prompt", required=True, help="the factual prompt (required; no chat template is applied)")
    parser.add_argument("--subject", required=True, help="the subject, as it appears in the prompt (required)")
    parser.add_argument("--target", help="the one-token answer (default: the model's greedy prediction)")
    parser.add_argument("--samples", type=_positive_int, default=5, metavar="N",
                        help="noise samples (default %(default)s)")
    parser.add_argument("--noise", type=float, default=3.0, metavar="STD",
                        help="noise std, in standard deviations of the embeddings (default %(default)s)")
    parser.add_argument("--window", type=_positive_int, default=10, metavar="N",
                        help="layers restored together for MLP and attention (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise samples (default %(default)s)")
    parser.add_argument("--out", default="trace", metavar="DIR", help="folder for the heatmaps (default %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="do not write heatmaps")
    _add_device_arguments(parser)


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


def _add_adapters_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="adapters_action", metavar="ACTION", required=True)
    inspect = actions.add_parser(
        "inspect", parents=[_global_options(suppress=True)],
        help="describe one adapter folder: method, sites, positions, rank, parameters, base model, training metrics")
    inspect.add_argument("folder", metavar="DIR", help="an adapter folder (written by ReftModel.save_pretrained or "
                                                       "IntervenableModel.save)")
    found = actions.add_parser("list", parents=[_global_options(suppress=True)],
                               help="find the adapter folders under a folder: path, method, base model, parameters")
    found.add_argument("folder", metavar="DIR", nargs="?", default=".",
                       help="the folder searched, with its subfolders (default %(default)s)")


def _base_text(info: dict) -> str:
    from reftkit.adapters import base_source, describe_base

    if info.get("base_model"):
        return base_source(info) or describe_base(info["base_model"])
    if info.get("model_fingerprint"):
        return f"(not recorded; {describe_base(info['model_fingerprint']).removeprefix('an unnamed model ')})"
    return "(not recorded)"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _training_text(metrics: dict) -> str:
    """"12 steps, final loss 1.2500, eval loss 1.5000, 4.2 s (runs/caps/metrics.json)"."""
    def number(key: str) -> bool:
        return isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool)

    parts = [f"{metrics['steps']} steps" if number("steps") else None,
             f"final loss {metrics['final_loss']:.4f}" if number("final_loss") else None,
             f"eval loss {metrics['eval_loss']:.4f}" if number("eval_loss") else None,
             f"{metrics['train_seconds']:.1f} s" if number("train_seconds") else None]
    return f"{', '.join(p for p in parts if p)} ({metrics['path']})"


def _run_adapters(args: argparse.Namespace) -> int:
    from reftkit.adapters import describe_base, find_adapters, read_adapter

    if args.adapters_action == "inspect":
        info = read_adapter(args.folder, metrics=True)
        if args.json:
            emit_json(info)
            return 0
        sites = info.get("sites") or []
        record = info.get("base_model") or {}
        weights = record.get("weights") if isinstance(record.get("weights"), dict) else None
        positions = info.get("positions")
        if positions is not None and info.get("tied") is not None:
            positions = f"{positions} ({'tied' if info['tied'] else 'untied'})"
        rows = [("path", info["path"]), ("kind", info["kind"]),
                ("name", info.get("adapter_name")), ("method", info.get("method")),
                ("sites", f"{', '.join(sites)} ({len(sites)})" if sites else None),
                ("positions", positions), ("rank", info.get("rank")),
                ("modules saved", ", ".join(info.get("modules_to_save") or []) or None),
                ("parameters", f"{_count(info.get('parameters'))} in {info['weights_file']}"
                 if info.get("weights_file") else None),
                ("base model", describe_base(record) if record else _base_text(info)),
                ("fingerprint", f"{weights['tensor']} {weights.get('shape')}" if weights else None),
                ("reftkit", info.get("reftkit_version"))]
        if info.get("metrics"):
            rows.append(("training", _training_text(info["metrics"])))
        width = max(len(key) for key, _ in rows)
        for key, value in rows:
            if value is not None:
                print(f"{key + ':':<{width + 1}}  {value}")
        return 0
    found = find_adapters(args.folder)
    rows = [{"path": info["path"], "kind": info.get("kind"), "method": info.get("method"),
             "base": None if "error" in info else _base_text(info), "parameters": info.get("parameters"),
             **({"error": info["error"]} if "error" in info else {})} for info in found]
    if args.json:
        emit_json(rows)
        return 0
    if not rows:
        status(f"no adapter folders under {args.folder}")
        return 0
    table = [(row["path"], row["method"] or "-", row["base"] if row["base"] else f"(unreadable: {row['error']})",
              _count(row["parameters"])) for row in rows]
    header = ("PATH", "METHOD", "BASE", "PARAMETERS")
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(3)]
    for row in [header, *table]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip())
    return 0


# ------------------------------------------------------------------------------------------------ steering

def _add_steer_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="steer_action", metavar="ACTION", required=True)
    extract = actions.add_parser(
        "extract", parents=[_global_options(suppress=True)],
        help="extract a steering vector from contrast pairs described by a YAML config")
    extract.add_argument("config", metavar="CONFIG", help="a YAML extraction config (see examples/steer/); its "
                                                          "relative paths are relative to its folder")
    extract.add_argument("--overwrite", action="store_true",
                         help="replace the vector in the output folder (the old one stays until the new one is "
                              "complete)")
    extract.add_argument("--device", metavar="DEVICE", help="where the model runs: cpu, cuda, cuda:N, mps or auto "
                         "(default: the config's device, else auto)")
    extract.add_argument("--dtype", metavar="DTYPE", help="dtype of the model's weights and activations: float32, "
                         "bfloat16 (bf16), float16 (fp16) or auto (default: the config's dtype, else float32)")
    inspect = actions.add_parser("inspect", parents=[_global_options(suppress=True)],
                                 help="describe a steering-vector folder: method, sites, norms, scope, unit, model")
    inspect.add_argument("folder", metavar="DIR", help="a folder written by `reftkit steer extract` or "
                                                       "SteeringVector.save")
    if _formats_module() is not None:
        export = actions.add_parser("export", parents=[_global_options(suppress=True)],
                                    help="write a steering vector as a llama.cpp control vector or an lm-eval file")
        export.add_argument("folder", metavar="DIR", help="a steering-vector folder")
        target = export.add_mutually_exclusive_group(required=True)
        target.add_argument("--gguf", metavar="FILE", help="write a llama.cpp control-vector GGUF file")
        target.add_argument("--lm-eval", metavar="FILE", help="write an lm-evaluation-harness steering file (.pt)")
        export.add_argument("--coefficient", type=float, default=1.0, metavar="C",
                            help="with --lm-eval: the strength baked into the file, in the vector's unit "
                                 "(default %(default)s)")
        export.add_argument("--overwrite", action="store_true", help="replace FILE when it exists")


def _formats_module():
    """`reftkit.steer.formats` where this install has it (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("reftkit.steer.formats")


def _number(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _diagnostics_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for site, info in (report.get("sites") or {}).items():
        info = info if isinstance(info, dict) else {}
        norm = info.get("norm")
        if isinstance(norm, list):  # a positional vector: one norm per position
            norm = max((n for n in norm if isinstance(n, (int, float))), default=None)
        rows.append((site, _number(norm), _number(info.get("hidden_norm")), _number(info.get("relative_norm")),
                     _number(info.get("consistency"), ".3f")))
    return rows


def _print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(f"{str(cell):<{w}}" for cell, w in zip(row, widths)).rstrip())


def _run_steer_extract(args: argparse.Namespace) -> int:
    from reftkit.steer.config import check_output, extraction_kwargs, load_steer_config

    cfg = load_steer_config(args.config)
    from reftkit.models import resolve_device, resolve_dtype

    for key, resolve, fallback in (("device", resolve_device, "auto"), ("dtype", resolve_dtype, "float32")):
        value = getattr(args, key) if getattr(args, key) is not None else cfg.get(key) or fallback
        resolve(value)  # a bad name fails before the model loads
        setattr(args, key, value)
    check_output(cfg["output"], args.overwrite)
    model, tokenizer = load_for_cli(cfg["model"], args)
    status(f"extracting a {cfg['method']} vector from {len(cfg['pairs_rows'])} pair(s) of {cfg['pairs']}")
    from reftkit.steer.config import save_vector
    from reftkit.steer.extract import extract

    kwargs = extraction_kwargs(cfg)
    if cfg["method"] != "actadd":
        kwargs["progress"] = not args.json
    vector = extract(model, tokenizer, cfg["pairs_rows"], **kwargs)
    folder = save_vector(vector, cfg["output"], overwrite=args.overwrite)
    report = vector.report
    if args.json:
        emit_json({"output": str(folder), "method": vector.method, "sites": vector.sites, "unit": vector.unit,
                   "scope": vector.scope, "report": report})
        return 0
    _print_table(("SITE", "|v|", "|h|", "|v|/|h|", "CONSISTENCY"), _diagnostics_rows(report))
    for warning in report.get("warnings") or []:
        print(f"warning: {warning}")
    print(f"vector: {folder}")
    return 0


def _read_vector_config(folder: str) -> dict:
    """`vector_config.json` of a steering-vector folder, read without torch."""
    path = Path(folder) / "vector_config.json"
    if not Path(folder).is_dir():
        raise ConfigError(f"steering-vector folder {folder!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"no vector_config.json in {folder}; expected a folder written by `reftkit steer extract` "
                          "or SteeringVector.save")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: byte {e.start} is not UTF-8 ({e.reason})") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); expected a steering vector config") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sites"), list):
        raise ConfigError(f"{path}: expected a JSON object with a list of 'sites'")
    return doc


def _run_steer_inspect(args: argparse.Namespace) -> int:
    doc = _read_vector_config(args.folder)
    if args.json:
        emit_json({"path": args.folder, **doc})
        return 0
    hint = doc.get("model_hint") if isinstance(doc.get("model_hint"), dict) else {}
    details = [str(hint[k]) for k in ("architecture", "model_type") if hint.get(k)]
    details += [f"hidden {hint['hidden_size']}"] if hint.get("hidden_size") is not None else []
    details += [f"{hint['num_layers']} layers"] if hint.get("num_layers") is not None else []
    model = hint.get("source") if isinstance(hint.get("source"), str) else ("(not recorded)" if not hint else "")
    counts = doc.get("counts") if isinstance(doc.get("counts"), dict) else {}
    report = doc.get("report") if isinstance(doc.get("report"), dict) else {}
    rows = [("path", args.folder), ("method", doc.get("method")), ("operator", doc.get("operator")),
            ("sites", f"{', '.join(map(str, doc['sites']))} ({len(doc['sites'])})"),
            ("scope", doc.get("scope")), ("unit", doc.get("unit")),
            ("pairs", f"{counts.get('positive')} positive, {counts.get('negative')} negative" if counts else None),
            ("read", report.get("read")),
            ("model", f"{model} ({', '.join(details)})".strip() if details else model),
            ("reftkit", doc.get("reftkit_version"))]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if value not in (None, ""):
            print(f"{key + ':':<{width + 1}}  {value}")
    table = _diagnostics_rows(report)
    if table:
        print()
        _print_table(("SITE", "|v|", "|h|", "|v|/|h|", "CONSISTENCY"), table)
    for warning in report.get("warnings") or []:
        print(f"warning: {warning}")
    return 0


def _run_steer_export(args: argparse.Namespace) -> int:
    from reftkit.steer import formats
    from reftkit.steer.vector import SteeringVector

    target = Path(args.gguf or args.lm_eval)
    if target.exists() and not args.overwrite:
        from reftkit.errors import OutputError

        raise OutputError(f"{target} exists; pass --overwrite to replace it, or choose another file")
    vector = SteeringVector.load(args.folder)
    if args.gguf:
        path = formats.export_gguf(vector, target)
    else:
        path = formats.export_lm_eval(vector, target, coefficient=args.coefficient)
    path = path or target
    if args.json:
        emit_json({"path": str(path)})
    else:
        print(f"wrote {path}")
    return 0


def _run_steer(args: argparse.Namespace) -> int:
    """`steer inspect` reads JSON only; the actions that load torch silence transformers as `main` does for
    commands that load models (the command is registered with `loads_models=False` for the sake of `inspect`)."""
    if args.steer_action == "inspect":
        return _run_steer_inspect(args)
    run = _run_steer_extract if args.steer_action == "extract" else _run_steer_export
    with quiet_transformers(not (args.verbose or args.debug)):
        return run(args)


COMMANDS: dict[str, Command] = {
    "models": Command(_add_models_arguments, _run_models, "built-in models (`models list`)", loads_models=False),
    "generate": Command(_add_generate_arguments, _run_generate, "greedy replies to prompts"),
    "train": Command(_add_train_arguments, _run_train, "train a ReFT adapter from a YAML recipe"),
    "eval": Command(_add_eval_arguments, _run_eval, "loss / accuracy of a model or adapter on a data file"),
    "demo": Command(_add_demo_arguments, _run_demo, "train a LoReFT adapter on SmolLM2 and compare replies"),
    "trace": Command(_add_trace_arguments, _run_trace, "causal tracing of a factual prompt (heatmaps per component)"),
    "adapters": Command(_add_adapters_arguments, _run_adapters, "inspect saved adapters (`adapters inspect DIR`, "
                        "`adapters list DIR`)", loads_models=False),
    "steer": Command(_add_steer_arguments, _run_steer, "steering vectors (`steer extract CONFIG`, `steer inspect DIR`)",
                     loads_models=False),
}


# ---------------------------------------------------------------------------------------------------- main

class UsageError(Exception):
    """A command line that the parser rejects; `main` prints it as one `error:` line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse prints the usage and `prog: error: ...` and exits; here an error is one line that names the
    `--help` to read. Subparsers are made of the same class."""

    def error(self, message: str):
        raise UsageError(f"{' '.join(message.split())} (see '{self.prog} --help')")


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


def _global_options(*, suppress: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else False
    parser.add_argument("--json", action="store_true", default=default, help="print results as one JSON document")
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="show transformers' own output: loading progress bars, load reports, warnings")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="debug logs and tracebacks (implies --verbose)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="reftkit", parents=[_global_options(suppress=False)],
        description="Interventions on hidden representations and Representation Finetuning (ReFT).")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    _configure_logging(args.debug)
    command = COMMANDS[args.command]
    try:
        with (quiet_transformers(not (args.verbose or args.debug)) if command.loads_models
              else contextlib.nullcontext()):
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
