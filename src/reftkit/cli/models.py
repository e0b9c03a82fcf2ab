"""`reftkit models list`: the built-in models, without importing torch or transformers."""

from __future__ import annotations

import argparse

from reftkit.cli.common import emit_json, global_options


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    actions.add_parser("list", help="list the built-in models", parents=[global_options(suppress=True)])


def run_models(args: argparse.Namespace) -> int:
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
