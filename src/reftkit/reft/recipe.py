"""A training run described by one YAML file: model, data, ReFT config and training arguments.

```yaml
model: smollm2-135m-instruct      # built-in name, local folder or .gguf
task: sft                         # sft | classification | dpo
data: data/caps_train.jsonl       # relative paths are relative to the folder of this file
eval_data: data/my_eval.jsonl     # optional
output_dir: runs/caps             # default runs/<file name without .yaml>, beside this file
chat: true                        # apply the chat template to prompts
max_length: 256
reft: {method: loreft, layers: [8, 16, 24], rank: 4, positions: f1+l1, tied: true}
train: {epochs: 3, batch_size: 8, lr: 0.004, save_every: 10}   # bf16: auto (default) | true | false
behaviour: all_caps               # optional: the check `reftkit demo` scores replies with (reftkit.behaviours)
device: cpu                       # optional: cpu (default) | cuda | cuda:N | mps | auto (`reftkit train --device`)
dtype: float32                    # optional: float32 (default) | bf16 | fp16 | auto (`reftkit train --dtype`)
```
For `classification` the model gets a head with `num_labels` outputs (or one per entry of `label_names`, which
maps string labels to ids); unless `reft.modules_to_save` says otherwise, the head is trained and saved with the
adapter. Every key is checked when the file is loaded, before any model is.

Design decisions
- **One rule for paths**: a relative `data`, `eval_data` or `output_dir` (and the default output folder) is
  relative to the folder the recipe file is in, as named (a symlinked recipe resolves beside the link), never to
  the current folder, so a recipe gives the same run from anywhere; `~` is expanded. `model` is a built-in name,
  or a path relative to the recipe folder when one exists there, else passed to `load_model` as written.
- **Nothing is lost**: `run_recipe` refuses a non-empty output folder unless `resume=True` (continue from
  `output_dir/checkpoint`, written every `train.save_every` steps) or `overwrite=True`. An overwrite trains in a
  hidden sibling `.NAME.overwrite` and swaps it in only when the new run is complete (`atomic.replace_folder`):
  until then the old run is untouched, and the folder never holds a mix of old and new files. A killed overwrite
  continues with `resume=True` (its checkpoint is found in the sibling); a new overwrite starts it afresh. Whether
  the folder is writable is probed before the model is loaded.
- `run_recipe` writes the adapter (`output_dir/adapter`), `metrics.json` (the loss of every step, continuous
  across resumes) and, when matplotlib is installed, `loss.png`; every file is written atomically.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from dataclasses import fields
from pathlib import Path

from ..atomic import check_writable, recover_folder, replace_folder, write_file
from ..behaviours import behaviour
from ..errors import ConfigError, ReftkitError
from ..yaml_config import beside, model_beside, read_mapping
from . import distributed
from .config import ReftConfig
from .data import encode, read_rows
from .model import ReftModel
from .train import TASKS, TrainArgs, check_output_folder, is_empty_folder, train

log = logging.getLogger(__name__)
TOP_KEYS = {"model", "task", "data", "eval_data", "output_dir", "chat", "max_length", "reft", "train", "num_labels",
            "label_names", "behaviour", "device", "dtype",
            "adapters"}  # adapters: the names a data column `adapter` may use (reftkit.reft.concepts)
PATH_KEYS = ("data", "eval_data", "output_dir")
FLAGS = ("--resume (resume=True)", "--overwrite (overwrite=True)")


def load_recipe(path: "str | Path") -> dict:
    """Read and check a recipe; relative paths in it come back relative to its folder (see the module docstring)."""
    path = Path(path).expanduser()
    cfg = read_mapping(path, TOP_KEYS, "recipe")
    for key in ("model", "data"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing key {key!r}")
    base = path.parent
    for key in PATH_KEYS:
        if cfg.get(key) is None:
            continue
        if not isinstance(cfg[key], str) or not cfg[key].strip():
            raise ConfigError(f"{path}: {key} must be a path (a string), got {cfg[key]!r}")
        cfg[key] = str(beside(base, cfg[key]))
    cfg.setdefault("output_dir", str(base / "runs" / path.stem))
    if cfg.get("output_dir") is None:
        raise ConfigError(f"{path}: output_dir must be a path, got null; omit it for {base / 'runs' / path.stem}")
    cfg["model"] = model_beside(base, cfg["model"])
    cfg.setdefault("task", "sft")
    if cfg["task"] not in TASKS:
        raise ConfigError(f"{path}: unknown task {cfg['task']!r}; expected one of {', '.join(TASKS)}")
    _check_values(cfg, path)
    try:  # checked now, before a model is loaded
        reft_config(cfg)
        train_args(cfg)
        if "behaviour" in cfg:  # the check `reftkit demo` scores replies with
            behaviour(cfg["behaviour"])
        check_device_options(cfg)
    except ReftkitError as e:
        raise type(e)(f"{path}: {e}") from e
    return cfg


def check_device_options(cfg: dict) -> None:
    """`device` and `dtype` (where the model is loaded, in which dtype: see `load_model`), checked before it is."""
    from ..models import resolve_device, resolve_dtype

    for key, resolve in (("device", resolve_device), ("dtype", resolve_dtype)):
        if cfg.get(key) is not None:
            if not isinstance(cfg[key], str):
                raise ConfigError(f"{key} must be a string such as 'cuda' or 'bf16', got {cfg[key]!r}")
            resolve(cfg[key])


def _check_values(cfg: dict, path: Path) -> None:
    """The types of the top-level values that are not paths."""
    if not isinstance(cfg["model"], str) or not cfg["model"].strip():
        raise ConfigError(f"{path}: model must be a model name or path (a string), got {cfg['model']!r}")
    if not isinstance(cfg.get("chat", True), bool):
        raise ConfigError(f"{path}: chat must be true or false, got {cfg['chat']!r}")
    for key in ("max_length", "num_labels"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}")
    names = cfg.get("label_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{path}: label_names must be a list of strings, got {names!r}")


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
    for key, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"train option {key} must be a finite number, got {value!r}")
    unknown = set(given) - allowed
    if unknown:
        raise ConfigError(f"unknown train options {sorted(unknown)}; expected {sorted(allowed)}")
    if "output_dir" in given:
        raise ConfigError(f"set output_dir at the top level of the recipe, not under 'train' (got "
                          f"{given['output_dir']!r})")
    given["output_dir"] = cfg["output_dir"]
    return TrainArgs(**given)


def run_folder(output_dir: "str | Path", *, resume: bool = False, overwrite: bool = False) -> Path:
    """Where a run of `output_dir` trains (see the module docstring): `output_dir` itself, or its hidden sibling
    `.NAME.overwrite` for an overwrite (and for the resume of an unfinished one). Checks the folder before anything
    is loaded: a non-empty one needs `resume` or `overwrite`, a resume needs a checkpoint, and files must be
    writable there."""
    out = Path(output_dir)
    staging = out.with_name(f".{out.name}.overwrite")
    if resume and overwrite:
        raise ConfigError(f"resume continues the run in {out} and overwrite replaces it; pass one of them")
    recover_folder(out)
    if resume:
        work = out
        if staging.is_dir():
            recover_folder(staging / "checkpoint")
        if (staging / "checkpoint" / "trainer_state.json").is_file():
            work = staging
            log.info("continuing the unfinished replacement of %s (in %s)", out, staging)
        recover_folder(work / "checkpoint")
        if not (work / "checkpoint" / "trainer_state.json").is_file():
            raise ConfigError(f"nothing to resume: no checkpoint in {work / 'checkpoint'} (checkpoints are written "
                              "every train.save_every steps; set it > 0 to make a run resumable)")
        return check_writable(work)
    if overwrite:
        if out.exists() and not out.is_dir():
            check_writable(out)  # raises: the output folder is a file
        if staging.exists() and not is_empty_folder(staging):
            log.info("discarding %s, an unfinished earlier replacement of %s", staging, out)
            shutil.rmtree(staging)
        return check_output_folder(staging, resume=False, overwrite=False)
    return check_output_folder(out, resume=False, overwrite=False, flags=FLAGS)


def find_checkpoint(output_dir: "str | Path") -> tuple[Path, int] | None:
    """The checkpoint a resume of `output_dir` would continue from, and its step; None when there is none."""
    out = Path(output_dir)
    for work in (out.with_name(f".{out.name}.overwrite"), out):
        state = work / "checkpoint" / "trainer_state.json"
        try:
            return state.parent, int(json.loads(state.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# components whose vectors have the model's hidden size, so a rank can be checked from config.json alone
_HIDDEN_WIDTH = ("embedding", "block_input", "block_output", "attention_input", "attention_output", "mlp_input",
                 "mlp_output")


def check_before_loading(cfg: dict, check_model: bool = True) -> dict[str, list[dict]]:
    """What can be checked before the model's weights load: every data row (read and checked now; returned as
    {"data": rows, "eval_data": rows}), and, from the model's config.json where it can be read cheaply
    (`models.peek_config`), the layers and the ranks at hidden-width sites."""
    from .data import check_rows

    rows = {}
    for key in ("data", "eval_data"):
        if cfg.get(key):
            rows[key] = read_rows(cfg[key])
            check_rows(rows[key], cfg["task"], str(cfg[key]))
    if not check_model:
        return rows
    from ..models import peek_config

    config = peek_config(cfg["model"])
    config = getattr(config, "text_config", None) or config
    n_layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not isinstance(n_layers, int) or not isinstance(hidden, int):
        return rows  # the full load checks the rest
    reft_cfg = reft_config(cfg)
    where = f"{cfg['model']} ({n_layers} layers, hidden size {hidden})"
    try:
        for spec in reft_cfg.sites(n_layers):
            if spec.component in _HIDDEN_WIDTH:
                reft_cfg.intervention_config(spec, hidden, f"L{spec.layer}.{spec.component}")
    except ReftkitError as e:
        raise type(e)(f"{where}: {e}") from None
    return rows


def run_recipe(cfg: dict, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
               model_and_tokenizer=None) -> dict:
    """Train the recipe `cfg` (from `load_recipe`) and write the run to `cfg["output_dir"]`: a non-empty folder
    needs `resume=True` (continue from its checkpoint) or `overwrite=True` (replace it once the new run is
    complete)."""
    from ..models import load_model

    device = distributed.setup(cfg.get("device"))  # under torchrun: join the group, one device per rank
    cfg = cfg if device is None or model_and_tokenizer is not None else {**cfg, "device": device}
    out = Path(cfg["output_dir"])
    task = cfg["task"]
    rows = check_before_loading(cfg, model_and_tokenizer is None)
    # under torchrun only rank 0 touches the run folder (see reftkit.reft.distributed)
    work = Path(distributed.on_main(lambda: str(run_folder(out, resume=resume, overwrite=overwrite))))
    if model_and_tokenizer is None:
        num_labels = cfg.get("num_labels") or len(cfg.get("label_names") or []) or 2
        kwargs = {"task": "sequence-classification", "num_labels": num_labels} if task == "classification" else {}
        kwargs.update({k: cfg[k] for k in ("device", "dtype") if cfg.get(k) is not None})
        model_and_tokenizer = load_model(cfg["model"], **kwargs)
    model, tok = model_and_tokenizer
    reft_cfg = reft_config(cfg)
    if task == "classification" and not reft_cfg.modules_to_save:
        head = next((n for n in ("classifier", "score") if hasattr(model, n)), None)
        if head:
            reft_cfg.modules_to_save = [head]
    chat = cfg.get("chat", True)
    max_length = int(cfg.get("max_length", 512))
    data = encode(tok, rows["data"], task, chat=chat, max_length=max_length,
                  label_names=cfg.get("label_names"), where=str(cfg["data"]))
    eval_data = None
    if cfg.get("eval_data"):
        eval_data = encode(tok, rows["eval_data"], task, chat=chat, max_length=max_length,
                           label_names=cfg.get("label_names"), where=str(cfg["eval_data"]))
    reft = ReftModel(model, reft_cfg)
    args = train_args(cfg)
    args.output_dir = str(work)
    args.progress = progress and args.progress
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    result = train(reft, data, args, task=task, pad_token_id=pad, eval_data=eval_data, resume=resume)
    trainable, total = reft.trainable_parameters()
    metrics = {"task": task, "model": cfg["model"], "steps": result["step"], "losses": result["losses"],
               "eval": result["eval"], "train_seconds": round(result["train_seconds"], 3),
               "examples_per_second": round(result["examples_per_second"], 3), "trainable_parameters": trainable,
               "total_parameters": total, "trainable_percent": 100 * trainable / total,
               "reft": reft_cfg.to_dict(), "adapter": str(out / "adapter")}

    def write() -> str | None:
        reft.save_pretrained(work / "adapter")
        write_file(work / "metrics.json", json.dumps(metrics, indent=2))
        plot = plot_losses(result["losses"], result["eval"], work / "loss.png")
        if work != out:
            replace_folder(work, out)
            log.info("replaced %s with the new run", out)
        return str(out / plot.name) if plot else None

    metrics["loss_plot"] = distributed.on_main(write)
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_file(path, buffer.getvalue())
