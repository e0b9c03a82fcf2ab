"""`reftkit steer extract|eval|inspect|export`: steering vectors (`eval` lives in steer_eval.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from reftkit.errors import ConfigError
from reftkit.cli.common import emit_json, global_options, load_for_cli, quiet_transformers, status


def add_steer_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="steer_action", metavar="ACTION", required=True)
    extract = actions.add_parser(
        "extract", parents=[global_options(suppress=True)],
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
    from reftkit.cli.steer_eval import add_steer_eval_arguments

    add_steer_eval_arguments(actions)
    inspect = actions.add_parser("inspect", parents=[global_options(suppress=True)],
                                 help="describe a steering-vector folder: method, sites, norms, scope, unit, model")
    inspect.add_argument("folder", metavar="DIR", help="a folder written by `reftkit steer extract` or "
                                                       "SteeringVector.save")
    if _formats_module() is not None:
        export = actions.add_parser("export", parents=[global_options(suppress=True)],
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

    from reftkit.cli.steer_eval import device_options

    cfg = load_steer_config(args.config)
    device_options(args, cfg)
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


def run_steer(args: argparse.Namespace) -> int:
    """`steer inspect` reads JSON only; the actions that load torch silence transformers as `main` does for
    commands that load models (the command is registered with `loads_models=False` for the sake of `inspect`)."""
    if args.steer_action == "inspect":
        return _run_steer_inspect(args)
    if args.steer_action == "eval":
        from reftkit.cli.steer_eval import run_steer_eval

        run = run_steer_eval
    else:
        run = _run_steer_extract if args.steer_action == "extract" else _run_steer_export
    with quiet_transformers(not (args.verbose or args.debug)):
        return run(args)
