"""`reftkit eval`: loss, accuracy or a behaviour rate of a model or adapter on a data file."""

from __future__ import annotations

import argparse

from reftkit.errors import ConfigError
from reftkit.cli.common import (
    BASE_MODEL_HELP, DEFAULT_MODEL, add_device_arguments, check_adapter_for_cli, emit_json, load_for_cli,
    positive_int, status,
)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=BASE_MODEL_HELP)
    parser.add_argument("--adapter", metavar="DIR", help="a saved adapter (omit to evaluate the base model)")
    parser.add_argument("--data", required=True, help="JSONL/CSV rows (prompt/completion, text/label, ...; required)")
    parser.add_argument("--task", default="sft", choices=("sft", "classification", "dpo"),
                        help="sft: completion loss; classification: loss and accuracy of a classification head; "
                             "dpo: preference loss and accuracy (default %(default)s)")
    parser.add_argument("--num-labels", type=positive_int, default=2, metavar="N",
                        help="classes of the classification head (task classification; default %(default)s)")
    parser.add_argument("--label-names", help="comma-separated label names, for string labels (classification)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="examples per forward (default %(default)s)")
    parser.add_argument("--max-length", type=positive_int, default=512, metavar="N",
                        help="longest example in tokens; a longer one is an error (default %(default)s)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template to prompts")
    parser.add_argument("--behaviour", metavar="SPEC",
                        help="also generate a greedy reply to every prompt and score it with this check: all_caps, "
                             "answer (the row's 'answer' field), json, contains:TEXT or regex:PATTERN; rows need only "
                             "a 'prompt' (default: no generation)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                        help="longest generated reply, with --behaviour (default %(default)s)")
    add_device_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
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
