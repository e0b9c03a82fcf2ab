"""The main demo: train a LoReFT adapter on the built-in SmolLM2 to answer in capital letters, then compare base
and adapted replies on held-out prompts. The behaviour is checkable by a rule (`is_all_caps`), so the demo
reports a success rate rather than asking the reader to judge."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConfigError
from ..chat import generate_replies


def is_all_caps(text: str) -> bool:
    """At least three letters, and every letter upper case."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 3 and all(c.isupper() for c in letters)


def run_demo(config_path: "str | Path" = "examples/caps.yaml", heldout_path: "str | Path | None" = None,
             *, progress: bool = True) -> dict:
    from ..models import load_model
    from .recipe import load_recipe, run_recipe

    config_path = Path(config_path)
    cfg = load_recipe(config_path)
    heldout_path = Path(heldout_path) if heldout_path else Path(cfg["data"]).with_name("caps_heldout.jsonl")
    if not heldout_path.is_file():
        raise ConfigError(f"held-out prompts {heldout_path} not found; pass --heldout FILE")
    prompts = [json.loads(line)["prompt"] for line in heldout_path.read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    model, tok = load_model(cfg["model"])
    load_s = time.perf_counter() - t0
    base = generate_replies(model, tok, prompts, max_new_tokens=32)
    metrics = run_recipe(cfg, progress=progress, model_and_tokenizer=(model, tok))
    from .model import ReftModel

    reft = ReftModel.from_pretrained(model, metrics["adapter"])
    adapted = generate_replies(reft, tok, prompts, max_new_tokens=32)
    reft.unload()
    return {
        "model": cfg["model"], "load_seconds": round(load_s, 2), "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"], "final_loss": metrics["losses"][-1],
        "trainable_parameters": metrics["trainable_parameters"], "total_parameters": metrics["total_parameters"],
        "trainable_percent": metrics["trainable_percent"],
        "base_success": sum(map(is_all_caps, base)) / len(prompts),
        "adapted_success": sum(map(is_all_caps, adapted)) / len(prompts),
        "replies": [{"prompt": p, "base": b, "adapted": a, "ok": is_all_caps(a)} for p, b, a in zip(prompts, base, adapted)],
        "adapter": metrics["adapter"], "loss_plot": metrics.get("loss_plot"),
    }
