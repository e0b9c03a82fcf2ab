"""`reftkit generate`: greedy replies, with an optional ReFT adapter, steering vectors (composed, each with its
coefficient) and conditional steering (CAST)."""

from __future__ import annotations

import argparse

from reftkit.errors import ConfigError
from reftkit.cli.common import (
    BASE_MODEL_HELP, DEFAULT_MODEL, add_device_arguments, attach_adapter, check_adapter_for_cli, load_for_cli,
    positive_int, print_replies, status,
)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=BASE_MODEL_HELP)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (required); repeat for a batch")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                        help="most tokens generated per reply, greedily (default %(default)s)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--adapter", metavar="DIR", help="a folder of saved ReFT interventions to apply")
    parser.add_argument("--steer", action="append", metavar="DIR[:C]",
                        help="a steering-vector folder (written by `reftkit steer extract` or SteeringVector.save) to "
                             "apply while generating, optionally with its own coefficient after a colon (DIR:2.5); "
                             "repeat to compose several vectors, applied in the order given; combines with --adapter")
    parser.add_argument("--coefficient", type=float, metavar="C",
                        help="strength of each --steer vector that gives no DIR:C of its own, in the vector's unit "
                             "(default: 1.0)")
    parser.add_argument("--scope", metavar="S",
                        help="tokens the --steer vectors edit: all, prompt, generated, "
                             "last_prompt_token_then_generated or a positions string such as 'l1@all' (default: each vector's own scope)")
    parser.add_argument("--unit", choices=("raw", "mean_diff_norm", "hidden_norm"),
                        help="unit of the coefficients: raw, mean_diff_norm or hidden_norm (default: each vector's "
                             "unit)")
    parser.add_argument("--condition", metavar="DIR",
                        help="conditional steering (CAST): a steering-vector folder whose direction decides, for each "
                             "prompt separately, whether the --steer vectors apply to it (needs --threshold)")
    parser.add_argument("--threshold", type=float, metavar="T",
                        help="with --condition: a prompt is steered when cos(h, tanh(P h)) is above T (or below, "
                             "with --condition-fire below); fit T with reftkit.steer.condition.fit_threshold")
    parser.add_argument("--condition-site", metavar="SITE",
                        help="with --condition: the site of the condition vector to use (default: its only site)")
    parser.add_argument("--condition-aggregate", choices=("mean", "last"), default="mean",
                        help="with --condition: the prompt's hidden state compared, mean over its tokens or the last "
                             "token (default %(default)s)")
    parser.add_argument("--condition-fire", choices=("above", "below"), default="above",
                        help="with --condition: steer when the similarity is above or below T (default %(default)s)")
    add_device_arguments(parser)


def split_steer(text: str) -> tuple[str, float | None]:
    """`DIR` or `DIR:C` -> (folder, coefficient or None). A folder that exists is taken whole, colon and all."""
    from pathlib import Path

    folder, sep, tail = text.rpartition(":")
    if not sep or not folder or Path(text).is_dir():
        return text, None
    try:
        value = float(tail)
    except ValueError:
        raise ConfigError(f"--steer {text!r}: expected DIR or DIR:C with a number C, got {tail!r} after the "
                          "colon") from None
    return folder, value


def _steer_for_cli(args: argparse.Namespace) -> list:
    """`--steer DIR[:C]` (repeatable), `--condition` and their options, read and checked before any model is
    loaded: [(vector, coefficient)] (empty without --steer); `args.condition_object` gets the Condition or None."""
    args.condition_object = None
    if not args.steer:
        for option in ("coefficient", "scope", "unit", "condition", "threshold", "condition_site"):
            if getattr(args, option) is not None:
                raise ConfigError(f"--{option.replace('_', '-')} needs --steer DIR (see 'reftkit generate --help')")
        return []
    from reftkit.errors import PositionError
    from reftkit.steer.vector import SteeringVector, check_coefficient, resolve_scope

    entries = []
    default = 1.0 if args.coefficient is None else args.coefficient
    for text in args.steer:
        folder, own = split_steer(text)
        vector = SteeringVector.load(folder)
        try:
            coefficient = check_coefficient(default if own is None else own)
            vector.raw_multipliers(coefficient, args.unit)
        except ConfigError as e:
            raise ConfigError(f"--steer {text}: {e}") from None
        if args.scope is not None:
            from reftkit.steer.apply import _as_positions

            try:
                resolve_scope(vector, _as_positions(args.scope))
            except PositionError as e:
                raise ConfigError(f"--scope {args.scope!r}: {e}") from None
        entries.append((folder, vector, coefficient))
    if args.condition is None:
        if args.threshold is not None or args.condition_site is not None:
            raise ConfigError("--threshold and --condition-site need --condition DIR")
    else:
        if args.threshold is None:
            raise ConfigError("--condition needs --threshold T (fit it with reftkit.steer.condition.fit_threshold)")
        from reftkit.steer.condition import Condition

        args.condition_vector = SteeringVector.load(args.condition)
        try:
            args.condition_object = Condition.from_vector(
                args.condition_vector, args.condition_site, threshold=args.threshold,
                aggregate=args.condition_aggregate, fire=args.condition_fire)
        except ConfigError as e:
            raise ConfigError(f"--condition {args.condition}: {e}") from None
    return entries


def _check_steer_fits(vector, model_name: str, where: str = "") -> None:
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
        raise IncompatibleModelError(f"the --steer vector {where} does not fit {model_name}: "
                                     f"{'; '.join(diffs)}")


def _steered_replies(model, tokenizer, entries, args: argparse.Namespace) -> list[str]:
    """Greedy replies (as `chat.generate_replies` makes them) with the vectors applied at their scopes, on top of
    the --adapter when there is one (`steer` takes the ReftModel); with --condition, only on the prompts whose
    condition fires."""
    import torch

    from reftkit.chat import left_padded
    from reftkit.steer.apply import _as_positions, steer

    base = getattr(model, "model", model) if args.adapter else model
    for _, vector, _ in entries:
        vector.check_model(base)
    device = next(base.parameters()).device
    batch = left_padded(tokenizer, args.prompt, not args.no_chat, device)
    pad = batch["input_ids"][0, 0].item() if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    scope = None if args.scope is None else _as_positions(args.scope)
    plan = [(vector, coefficient) for _, vector, coefficient in entries]
    condition = args.condition_object
    if condition is not None:
        sims = condition.similarities(base, tokenizer, args.prompt, chat=not args.no_chat)
        fired = condition.decide(sims)
        for prompt, sim, f in zip(args.prompt, sims.tolist(), fired):
            status(f"condition {'fires' if f else 'does not fire'} (similarity {sim:.3f}, threshold "
                   f"{condition.threshold:g} {condition.fire}): {prompt[:60]}")
        plan = [(vector, condition.row_coefficients(sims, coefficient)) for vector, coefficient in plan]
        if not any(fired):
            plan = []
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        if plan:
            with steer(model, plan, scope=scope, unit=args.unit) as steered:
                out = steered.generate(batch["input_ids"], batch["attention_mask"], **generate_kwargs)
        else:
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 **generate_kwargs)
    T = batch["input_ids"].shape[1]
    return [tokenizer.decode(o[T:], skip_special_tokens=True).strip() for o in out]


def run_generate(args: argparse.Namespace) -> int:
    entries = _steer_for_cli(args)
    model_name = check_adapter_for_cli(args.adapter, args.model) if args.adapter else (args.model or DEFAULT_MODEL)
    for folder, vector, _ in entries:
        _check_steer_fits(vector, model_name, folder)
    if args.condition_object is not None:
        _check_steer_fits(args.condition_vector, model_name, args.condition)
    model, tokenizer = load_for_cli(model_name, args)
    if args.adapter:
        model = attach_adapter(model, args.adapter)
    if entries:
        what = ", ".join(f"{folder} ({coefficient:g})" for folder, _, coefficient in entries)
        status(f"generating {len(args.prompt)} repl{'y' if len(args.prompt) == 1 else 'ies'} steered by {what}"
               + (f" with the adapter {args.adapter}" if args.adapter else "")
               + (f" where {args.condition} fires" if args.condition else ""))
        replies = _steered_replies(model, tokenizer, entries, args)
    else:
        status(f"generating {len(args.prompt)} repl{'y' if len(args.prompt) == 1 else 'ies'}")
        from reftkit.chat import generate_replies

        replies = generate_replies(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                                   chat=not args.no_chat)
    print_replies(args, model_name, args.prompt, replies)
    return 0
