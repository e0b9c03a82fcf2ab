"""`reftkit steer eval CONFIG.yaml`: steering vectors, ReFT adapters, prompting baselines and the base model on one
evaluation protocol, written as a report folder (report.json and a sweep plot per method with a grid)."""

from __future__ import annotations

import argparse
from typing import Any

from reftkit.cli.common import emit_json, global_options, load_for_cli, status


def add_steer_eval_arguments(actions: Any) -> None:
    """The `eval` action of `reftkit steer` (`actions` is its sub-parser group)."""
    parser = actions.add_parser(
        "eval", parents=[global_options(suppress=True)],
        help="evaluate steering vectors, adapters and prompting baselines on one protocol (a YAML config)")
    parser.add_argument("config", metavar="CONFIG", help="a YAML evaluation config (see examples/steer/); its "
                                                         "relative paths are relative to its folder")
    parser.add_argument("--output", metavar="DIR", help="the report folder (default: the config's output, else "
                                                        "runs/<config name> beside the config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report folder (the old one stays until the new one is complete)")
    parser.add_argument("--device", metavar="DEVICE", help="where the model runs: cpu, cuda, cuda:N, mps or auto "
                        "(default: the config's device, else auto)")
    parser.add_argument("--dtype", metavar="DTYPE", help="dtype of the model's weights and activations: float32, "
                        "bfloat16 (bf16), float16 (fp16) or auto (default: the config's dtype, else float32)")


def _entries(cfg: dict, model) -> tuple[list[dict], list]:
    """The methods of a checked config as `compare` entries, and the ReftModels to unload afterwards."""
    from reftkit.steer.methods import AdapterMethod, BaseMethod, ConditionalMethod, PromptMethod, VectorMethod

    entries, refts = [], []
    for m in cfg["methods"]:
        entry = {"name": m["name"], "coefficients": None}
        if m["kind"] == "base":
            entry["method"] = BaseMethod()
        elif m["kind"] == "prompt":
            entry["method"] = PromptMethod(m["prompt"], m["role"])
        elif m["kind"] == "adapter":
            from reftkit.reft.model import ReftModel

            reft = ReftModel.from_pretrained(model, m["adapter"])
            refts.append(reft)
            reft.eval()
            entry["method"] = AdapterMethod(reft)
        else:
            vector = m["vector_object"]
            vector.check_model(model)
            entry.update(coefficients=m["coefficients"], scope=m["scope"], unit=m["unit"])
            if m.get("sites"):
                entry.update(vector=vector, sites=m["sites"])
            elif m.get("condition_object") is not None:
                entry["method"] = ConditionalMethod(vector, m["condition_object"], scope=m["scope"], unit=m["unit"])
            else:
                entry["method"] = VectorMethod(vector, scope=m["scope"], unit=m["unit"])
        entries.append(entry)
    return entries, refts


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    from reftkit.steer.compare import TABLE_COLUMNS

    columns = list(TABLE_COLUMNS) + (["within_budget"] if any(r.get("within_budget") is not None for r in rows)
                                     else [])
    header = [c.upper() for c in columns]
    body = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(columns))]
    for line in [header, *body]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def device_options(args: argparse.Namespace, cfg: dict) -> None:
    """`--device`/`--dtype`, else the config's `device`/`dtype`, else auto/float32, into `args`; a bad name fails
    here, before the model loads."""
    from reftkit.models import resolve_device, resolve_dtype

    for key, resolve, fallback in (("device", resolve_device, "auto"), ("dtype", resolve_dtype, "float32")):
        value = getattr(args, key) if getattr(args, key) is not None else cfg.get(key) or fallback
        resolve(value)
        setattr(args, key, value)


def run_steer_eval(args: argparse.Namespace) -> int:
    from reftkit.steer.eval_config import check_output, load_eval_config, write_report

    cfg = load_eval_config(args.config)
    if args.output:
        cfg["output"] = args.output
    device_options(args, cfg)
    check_output(cfg["output"], args.overwrite)
    model, tokenizer = load_for_cli(cfg["model"], args)
    from reftkit.steer.compare import compare

    entries, refts = _entries(cfg, model)
    try:
        report = compare(model, tokenizer, entries, cfg["data_rows"], behaviour_spec=cfg["behaviour"],
                         seed=cfg["seed"], fluency=cfg["fluency"], kl_budget=cfg.get("kl_budget"), chat=cfg["chat"],
                         max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"],
                         progress=lambda name, i, n: status(f"evaluating {name} ({i + 1}/{n})"))
    finally:
        for reft in refts:
            reft.unload()
    report["config"] = str(args.config)
    report["model"] = cfg["model"]
    report["data"] = {k: {"file": cfg["data"][k], "rows": len(v)} for k, v in cfg["data_rows"].items()}
    plots = {f"sweep_{name}.png": r for name, r in report["methods"].items()
             if len([c for c in r.get("coefficients", []) if c is not None]) >= 2}
    folder = write_report(report, cfg["output"], plots)
    if args.json:
        emit_json({"output": str(folder), "table": report["table"], "plots": sorted(plots)})
        return 0
    print_table(report["table"])
    print(f"report: {folder}")
    return 0
