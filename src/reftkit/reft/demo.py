"""The main demo: train a LoReFT adapter on the built-in SmolLM2 to answer in capital letters, then compare base
and adapted replies on held-out prompts. The behaviour is checkable by a rule (the recipe's `behaviour`, `all_caps`
in the shipped recipe; see `reftkit.behaviours`), so the demo reports a success rate rather than asking the reader
to judge.

Design decisions
- The recipe and its data ship inside the package (`reftkit/examples/caps.yaml`, `reftkit/examples/data/`,
  found with `importlib.resources`), so the demo runs from any folder. The repository's `examples/caps.yaml` and
  `examples/data/caps_*.jsonl` are links to these files: one copy of each.
- The demo writes its own run folder, `output_dir` (default `runs/demo` of the current folder), whatever the
  recipe's `output_dir` says: the packaged recipe's would be inside the installed package. Like `reftkit train`
  it refuses a non-empty folder unless it resumes (`resume=True`, which, on a finished run, only replays the
  comparison) or replaces it (`overwrite=True`), and checks that before the model is loaded.
- The held-out prompts default to `caps_heldout.jsonl` beside the recipe's training data.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..behaviours import behaviour, is_all_caps  # noqa: F401  (is_all_caps: the demo's check, kept importable)
from ..chat import generate_replies
from ..errors import ConfigError, DataError

DEMO_RECIPE = "caps.yaml"
DEMO_OUTPUT = "runs/demo"


def example_path(name: str = DEMO_RECIPE) -> Path:
    """A file shipped in the package's `examples/` folder: the demo recipe `caps.yaml`, or its data
    `data/caps_train.jsonl` and `data/caps_heldout.jsonl`."""
    from importlib.resources import files

    path = Path(str(files("reftkit").joinpath("examples", *Path(name).parts)))
    if not path.is_file():
        raise ConfigError(f"reftkit's packaged example {name!r} is missing (looked for {path}); reinstall reftkit, "
                          "or pass the file's path instead")
    return path


def demo_setup(config_path: "str | Path | None" = None, heldout_path: "str | Path | None" = None,
               output_dir: "str | Path" = DEMO_OUTPUT) -> tuple[dict, list[str]]:
    """The demo's recipe (the packaged one unless `config_path` is given), with `output_dir` set, and its held-out
    prompts. Reads files only; nothing is loaded or written."""
    from .data import read_rows
    from .recipe import load_recipe

    config_path = Path(config_path).expanduser() if config_path else example_path(DEMO_RECIPE)
    cfg = load_recipe(config_path)
    cfg["output_dir"] = str(Path(output_dir).expanduser())
    heldout = Path(heldout_path).expanduser() if heldout_path else Path(cfg["data"]).with_name("caps_heldout.jsonl")
    if not heldout.is_file():
        raise ConfigError(f"held-out prompts {heldout} not found; pass --heldout FILE (a JSONL of "
                          '{"prompt": ...} rows)')
    rows = read_rows(heldout)
    missing = [n for n, row in enumerate(rows, 1) if not isinstance(row, dict) or not isinstance(row.get("prompt"), str)]
    if missing:
        raise DataError(f"{heldout}: row {missing[0]} has no 'prompt' string; every held-out row needs one")
    return cfg, [row["prompt"] for row in rows]


def run_demo(config_path: "str | Path | None" = None, heldout_path: "str | Path | None" = None, *,
             output_dir: "str | Path" = DEMO_OUTPUT, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict:
    from ..models import load_model
    from .recipe import run_folder, run_recipe

    cfg, prompts = demo_setup(config_path, heldout_path, output_dir)
    check = behaviour(cfg.get("behaviour", "all_caps"))
    if check.needs_answer:
        raise ConfigError(f"the demo compares replies to held-out prompts without answers; behaviour {check.spec!r} "
                          "needs an answer per row (use reftkit eval --behaviour for that)")
    run_folder(cfg["output_dir"], resume=resume, overwrite=overwrite)  # refuse now, before the model is loaded
    t0 = time.perf_counter()
    model, tok = load_model(cfg["model"])
    load_s = time.perf_counter() - t0
    base = generate_replies(model, tok, prompts, max_new_tokens=32)
    metrics = run_recipe(cfg, resume=resume, overwrite=overwrite, progress=progress, model_and_tokenizer=(model, tok))
    from .model import ReftModel

    reft = ReftModel.from_pretrained(model, metrics["adapter"])
    adapted = generate_replies(reft, tok, prompts, max_new_tokens=32)
    reft.unload()
    return {
        "model": cfg["model"], "load_seconds": round(load_s, 2), "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"], "final_loss": metrics["losses"][-1],
        "trainable_parameters": metrics["trainable_parameters"], "total_parameters": metrics["total_parameters"],
        "trainable_percent": metrics["trainable_percent"],
        "behaviour": check.spec,
        "base_success": sum(map(check.check, base)) / len(prompts),
        "adapted_success": sum(map(check.check, adapted)) / len(prompts),
        "replies": [{"prompt": p, "base": b, "adapted": a, "ok": check.check(a)} for p, b, a in zip(prompts, base, adapted)],
        "adapter": metrics["adapter"], "output_dir": cfg["output_dir"], "loss_plot": metrics.get("loss_plot"),
    }
