"""`reftkit train` (a YAML recipe) and `reftkit demo` (the built-in caps recipe), with their run folders,
`--resume`/`--overwrite` and the line that says how to continue after Ctrl-C.

`reftkit train` runs unchanged under `torchrun --nproc_per_node N -m reftkit train RECIPE` (the processes share each
global batch; only rank 0 prints and writes: see docs/scaling.md). Data with an `adapter` column trains one adapter
per name in one pass (`reftkit.reft.concepts`)."""

from __future__ import annotations

import argparse
import os

from reftkit.cli.common import emit_json, status


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training recipe (default: the caps.yaml shipped with reftkit)")
    parser.add_argument("--heldout", help="JSONL of held-out prompts (default: caps_heldout.jsonl beside the data)")
    parser.add_argument("--output-dir", default="runs/demo", help="run folder (default runs/demo)")
    add_run_folder_arguments(parser)


def add_run_folder_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in the output folder from its checkpoint")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace the run in the output folder (the old one stays until the new one is complete)")


def on_interrupt(command: str, output_dir: str, cfg: dict) -> str:
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


def run_demo(args: argparse.Namespace) -> int:
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
        args.on_interrupt = on_interrupt(command, cfg["output_dir"], cfg)
        raise
    if args.json:
        emit_json(result)
        return 0
    for row in result["replies"]:
        print(f"> {row['prompt']}")
        print(f"  base:    {one_line(row['base'])}")
        print(f"  adapted: {one_line(row['adapted'])}  [{'ok' if row['ok'] else 'miss'}]")
    print()
    print(f"all-caps replies on {len(result['replies'])} held-out prompts: base {result['base_success']:.0%}, "
          f"adapted {result['adapted_success']:.0%}")
    print(f"trainable parameters: {result['trainable_parameters']:,} of {result['total_parameters']:,} "
          f"({result['trainable_percent']:.4f}%); {result['steps']} steps in {result['train_seconds']:.0f} s, "
          f"final loss {result['final_loss']:.3f}")
    print(f"adapter saved in {result['adapter']}")
    return 0


def one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML training recipe (see examples/); its relative paths are relative to "
                                       "its folder")
    add_run_folder_arguments(parser)
    parser.add_argument("--device", metavar="DEVICE", help="where to train: cpu, cuda, cuda:N, mps or auto (default: "
                        "the recipe's device, else cpu)")
    parser.add_argument("--dtype", metavar="DTYPE", help="dtype of the base model's weights: float32, bfloat16 (bf16), "
                        "float16 (fp16) or auto (default: the recipe's dtype, else float32)")


def run_train(args: argparse.Namespace) -> int:
    import shlex

    from reftkit.reft.recipe import check_device_options, load_recipe, run_recipe

    from reftkit.reft import distributed
    from reftkit.reft.concepts import has_adapter_column, run_concept_recipe
    from reftkit.reft.data import read_rows

    cfg = load_recipe(args.config)
    for key in ("device", "dtype"):  # the command line wins over the recipe
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    check_device_options(cfg)
    # one adapter per name of the data's `adapter` column, trained in one pass (reftkit.reft.concepts)
    concepts = "adapters" in cfg or has_adapter_column(read_rows(cfg["data"]))
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
    if main_rank:
        method = cfg.get("reft", {}).get("method", "loreft")
        what = f"one {method} adapter per name in the data's adapter column" if concepts else method
        status(f"training {what} on {cfg['model']} -> {cfg['output_dir']}")
    runner = run_concept_recipe if concepts else run_recipe
    try:
        metrics = runner(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.json)
    except KeyboardInterrupt:
        args.on_interrupt = on_interrupt(f"reftkit train {shlex.quote(args.config)}", cfg["output_dir"], cfg)
        raise
    finally:
        distributed.close()
    if not main_rank:
        return 0
    if args.json:
        emit_json(metrics)
        return 0
    print(f"trained {metrics['steps']} steps in {metrics['train_seconds']:.1f} s "
          f"({metrics['examples_per_second']:.2f} examples/s); final loss {metrics['losses'][-1]:.4f}")
    if metrics["eval"]:
        print(f"eval loss {metrics['eval'][-1][1]:.4f}")
    print(f"trainable parameters: {metrics['trainable_parameters']:,} ({metrics['trainable_percent']:.4f}%)")
    for name, info in (metrics.get("adapters") or {}).items():
        print(f"adapter {name}: {info['folder']} ({info['examples']} examples, final loss {info['losses'][-1]:.4f})")
    if not metrics.get("adapters"):
        print(f"adapter: {metrics['adapter']}")
    if metrics.get("loss_plot"):
        print(f"loss curve: {metrics['loss_plot']}")
    return 0
