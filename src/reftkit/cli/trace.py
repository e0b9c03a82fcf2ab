"""`reftkit trace`: causal tracing of a factual prompt."""

from __future__ import annotations

import argparse

from reftkit.cli.common import (
    DEFAULT_MODEL, MODEL_HELP, add_device_arguments, emit_json, load_for_cli, positive_int, status,
)


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--prompt", required=True, help="the factual prompt (required; no chat template is applied)")
    parser.add_argument("--subject", required=True, help="the subject, as it appears in the prompt (required)")
    parser.add_argument("--target", help="the one-token answer (default: the model's greedy prediction)")
    parser.add_argument("--samples", type=positive_int, default=5, metavar="N",
                        help="noise samples (default %(default)s)")
    parser.add_argument("--noise", type=float, default=3.0, metavar="STD",
                        help="noise std, in standard deviations of the embeddings (default %(default)s)")
    parser.add_argument("--window", type=positive_int, default=10, metavar="N",
                        help="layers restored together for MLP and attention (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise samples (default %(default)s)")
    parser.add_argument("--out", default="trace", metavar="DIR", help="folder for the heatmaps (default %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="do not write heatmaps")
    add_device_arguments(parser)


def run_trace(args: argparse.Namespace) -> int:
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
