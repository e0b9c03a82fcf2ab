"""A training run described by one YAML file: model, data, ReFT config and training arguments.

```yaml
model: smollm2-135m-instruct      # built-in name, local folder or .gguf
task: sft                         # sft | classification | dpo
data: data/caps_train.jsonl       # relative paths are also looked up beside this file
eval_data: data/my_eval.jsonl     # optional
output_dir: runs/caps
chat: true                        # apply the chat template to prompts
max_length: 256
reft: {method: loreft, layers: [8, 16, 24], rank: 4, positions: f1+l1, tied: true}
train: {epochs: 3, batch_size: 8, lr: 0.004, save_every: 10}
```
For `classification` the model gets a head with `num_labels` outputs (or one per entry of `label_names`, which
maps string labels to ids); unless `reft.modules_to_save` says otherwise, the head is trained and saved with the
adapter. Every key is checked when the file is loaded, before any model is.
`run_recipe` writes the adapter (`output_dir/adapter`), `metrics.json` and, when matplotlib is installed,
`loss.png`; with `resume=True` it continues from `output_dir/checkpoint` (written every `train.save_every` steps).
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

from ..errors import ConfigError
from .config import ReftConfig
from .data import encode, read_rows
from .model import ReftModel
from .train import TASKS, TrainArgs, train

log = logging.getLogger(__name__)
TOP_KEYS = {"model", "task", "data", "eval_data", "output_dir", "chat", "max_length", "reft", "train", "num_labels",
            "label_names"}


def load_recipe(path: "str | Path") -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping with keys {sorted(TOP_KEYS)}")
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(TOP_KEYS)}")
    for key in ("model", "data"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing key {key!r}")
    base = path.parent
    for key in ("data", "eval_data"):
        if cfg.get(key) and not Path(cfg[key]).is_absolute() and not Path(cfg[key]).exists():
            cfg[key] = str(base / cfg[key])
    cfg.setdefault("task", "sft")
    cfg.setdefault("output_dir", str(Path("runs") / path.stem))
    if cfg["task"] not in TASKS:
        raise ConfigError(f"{path}: unknown task {cfg['task']!r}; expected one of {', '.join(TASKS)}")
    reft_config(cfg)  # checked now, before a model is loaded
    train_args(cfg)
    return cfg


def reft_config(cfg: dict) -> ReftConfig:
    given = cfg.get("reft") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"'reft' must be a mapping of ReftConfig fields, got {given!r}")
    return ReftConfig.from_dict(given)


def train_args(cfg: dict) -> TrainArgs:
    allowed = {f.name for f in fields(TrainArgs)}
    given = cfg.get("train") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"'train' must be a mapping of training options, got {given!r}")
    given = dict(given)
    unknown = set(given) - allowed
    if unknown:
        raise ConfigError(f"unknown train options {sorted(unknown)}; expected {sorted(allowed)}")
    given.setdefault("output_dir", cfg["output_dir"])
    return TrainArgs(**given)


def run_recipe(cfg: dict, *, resume: bool = False, progress: bool = True, model_and_tokenizer=None) -> dict:
    from ..models import load_model

    task = cfg["task"]
    if model_and_tokenizer is None:
        num_labels = cfg.get("num_labels") or len(cfg.get("label_names") or []) or 2
        kwargs = {"task": "sequence-classification", "num_labels": num_labels} if task == "classification" else {}
        model_and_tokenizer = load_model(cfg["model"], **kwargs)
    model, tok = model_and_tokenizer
    reft_cfg = reft_config(cfg)
    if task == "classification" and not reft_cfg.modules_to_save:
        head = next((n for n in ("classifier", "score") if hasattr(model, n)), None)
        if head:
            reft_cfg.modules_to_save = [head]
    chat = cfg.get("chat", True)
    max_length = int(cfg.get("max_length", 512))
    data = encode(tok, read_rows(cfg["data"]), task, chat=chat, max_length=max_length,
                  label_names=cfg.get("label_names"), where=str(cfg["data"]))
    eval_data = None
    if cfg.get("eval_data"):
        eval_data = encode(tok, read_rows(cfg["eval_data"]), task, chat=chat, max_length=max_length,
                           label_names=cfg.get("label_names"), where=str(cfg["eval_data"]))
    reft = ReftModel(model, reft_cfg)
    args = train_args(cfg)
    args.progress = progress and args.progress
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    result = train(reft, data, args, task=task, pad_token_id=pad, eval_data=eval_data, resume=resume)
    out = Path(cfg["output_dir"])
    reft.save_pretrained(out / "adapter")
    trainable, total = reft.trainable_parameters()
    metrics = {"task": task, "model": cfg["model"], "steps": result["step"], "losses": result["losses"],
               "eval": result["eval"], "train_seconds": round(result["train_seconds"], 3),
               "examples_per_second": round(result["examples_per_second"], 3), "trainable_parameters": trainable,
               "total_parameters": total, "trainable_percent": 100 * trainable / total,
               "reft": reft_cfg.to_dict(), "adapter": str(out / "adapter")}
    tmp = out / "metrics.json.tmp"  # written beside and renamed: a reader never sees half a file
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(out / "metrics.json")
    plot = plot_losses(result["losses"], result["eval"], out / "loss.png")
    metrics["loss_plot"] = str(plot) if plot else None
    return metrics


def plot_losses(losses: list[float], evals: list, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot (pip install 'reftkit[plot]')")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, label="train")
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
