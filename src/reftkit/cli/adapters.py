"""`reftkit adapters inspect|list`: read saved adapters without importing torch."""

from __future__ import annotations

import argparse
from typing import Any

from reftkit.cli.common import emit_json, global_options, status


def add_adapters_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="adapters_action", metavar="ACTION", required=True)
    inspect = actions.add_parser(
        "inspect", parents=[global_options(suppress=True)],
        help="describe one adapter folder: method, sites, positions, rank, parameters, base model, training metrics")
    inspect.add_argument("folder", metavar="DIR", help="an adapter folder (written by ReftModel.save_pretrained or "
                                                       "IntervenableModel.save)")
    found = actions.add_parser("list", parents=[global_options(suppress=True)],
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


def run_adapters(args: argparse.Namespace) -> int:
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
