"""`reftkit generate`: greedy replies, with an optional ReFT adapter and steering vector."""

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
    parser.add_argument("--steer", metavar="DIR", help="a steering-vector folder (written by `reftkit steer extract` "
                                                       "or SteeringVector.save) to apply while generating")
    parser.add_argument("--coefficient", type=float, metavar="C",
                        help="strength of the --steer vector, in its unit (default: 1.0 with --steer)")
    parser.add_argument("--scope", metavar="S",
                        help="tokens the --steer vector edits: all, prompt, generated, last_prompt_token_then_generated "
                             "or a positions string such as 'l1@all' (default: the vector's own scope)")
    parser.add_argument("--unit", choices=("raw", "mean_diff_norm", "hidden_norm"),
                        help="unit of --coefficient: raw, mean_diff_norm or hidden_norm (default: the vector's unit)")
    add_device_arguments(parser)


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


def run_generate(args: argparse.Namespace) -> int:
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
    print_replies(args, model_name, args.prompt, replies)
    return 0
