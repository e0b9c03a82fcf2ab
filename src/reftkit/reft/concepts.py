"""Many adapters in one pass ("batched concept training"): K independent adapters, e.g. one rank-1 LoReFT per
concept, trained in a single run in which every example is routed to its own adapter, so K adapters cost about
one pass over the base model instead of K.

```python
reft = concept_model(model, ReftConfig(layers=[4], rank=1), ["caps", "french", "pirate"])
result = train_concepts(reft, {"caps": caps_examples, "french": ..., "pirate": ...}, TrainArgs(...))
reft.save_pretrained("runs/concepts")            # one folder per adapter: runs/concepts/caps, ...
```

From a recipe, a data column `adapter` names each row's adapter (`reftkit train recipe.yaml`); the recipe's
optional `adapters: [caps, french, pirate]` lists the names allowed, and the run writes one adapter folder per
name in `output_dir/adapters/<name>`, beside `metrics.json` (each adapter's loss curve) and the checkpoint.

Decisions:
- Independence: each adapter keeps its own data order (batches of `batch_size` of its own examples, shuffled by
  the run's seed as a run on that data alone is), its own epochs, step count and learning-rate schedule, its
  loss normalised by its own items and its gradients clipped on their own. A step concatenates every adapter's
  batch into one forward, and an adapter whose steps are done gets no rows and is left as it is. Each adapter
  therefore ends as it would trained alone on its own data with the same seed (the tests check it).
- Every adapter starts from the same config (and seed), as it would in a run of its own.
- Tasks sft and dpo (classification heads would be shared by all adapters); no `modules_to_save`.
- Runs under `torchrun` as the one-adapter loop does (`reftkit.reft.train`): the concatenated batch is split.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from ..atomic import replace_folder, write_file
from ..errors import ConfigError, DataError
from . import distributed
from .config import ReftConfig
from .data import Example, encode
from .model import ReftModel
from .recipe import check_before_loading, reft_config, run_folder, train_args
from .train import Stream, TrainArgs, train_streams

log = logging.getLogger(__name__)
ADAPTER_COLUMN = "adapter"
CONCEPT_TASKS = ("sft", "dpo")


def concept_model(model, config: ReftConfig, names: list[str]) -> ReftModel:
    """A `ReftModel` with one adapter per name, each built from `config`."""
    if not names:
        raise ConfigError("concept training needs at least one adapter name")
    if config.modules_to_save:
        raise ConfigError("adapters trained in one pass cannot list modules_to_save: the modules would be shared "
                          "by every adapter; train adapters with their own heads one at a time")
    reft = ReftModel(model)
    for name in names:
        reft.add_adapter(name, copy.deepcopy(config), activate=False)
    return reft


def train_concepts(reft: ReftModel, data: dict[str, list[Example]], args: TrainArgs, *, task: str = "sft",
                   pad_token_id: int = 0, resume: bool = False, overwrite: bool = False) -> dict:
    """Train each adapter of `reft` named in `data` on its own examples, all in one pass (see the module
    docstring). Returns the metrics of `train`, with `adapter_losses` (name -> loss of each of its steps)."""
    if task not in CONCEPT_TASKS:
        raise ConfigError(f"training adapters in one pass supports the tasks {', '.join(CONCEPT_TASKS)}, not {task!r}")
    if not data:
        raise DataError("no adapter has training data")
    unknown = [name for name in data if name not in reft.configs]
    if unknown:
        raise ConfigError(f"the data names adapters {unknown} that the model does not have; its adapters are "
                          f"{reft.adapter_names} (add them with concept_model or add_adapter)")
    for name in data:
        if reft.configs[name].modules_to_save:
            raise ConfigError(f"adapter {name!r} lists modules_to_save, which adapters trained in one pass would "
                              "share; train it on its own")
    streams = [Stream(name, examples) for name, examples in data.items()]
    return train_streams(reft, streams, args, task=task, pad_token_id=pad_token_id, resume=resume,
                         overwrite=overwrite)


def split_rows(rows: list[dict], names: list[str] | None, where: str = "data") -> dict[str, list[dict]]:
    """Group rows by their `adapter` column: name -> rows, in the order of `names` (else of first appearance).
    Every row needs the column; with `names`, every value must be one of them."""
    if names is not None and (not isinstance(names, list) or not names
                              or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
        raise ConfigError(f"adapters must be a list of distinct adapter names, got {names!r}")
    groups: dict[str, list[dict]] = {name: [] for name in names or []}
    for i, row in enumerate(rows, 1):
        value = row.get(ADAPTER_COLUMN) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}, row {i}: missing field {ADAPTER_COLUMN!r} (the name of the adapter this "
                            "example trains); give every row one, or drop the column to train one adapter")
        if names is not None and value not in groups:
            raise DataError(f"{where}, row {i}: adapter {value!r} is not one of the recipe's adapters {names}; "
                            "add it to `adapters` or correct the row")
        groups.setdefault(value, []).append(row)
    empty = [name for name, rs in groups.items() if not rs]
    if empty:
        raise DataError(f"{where}: no row names the adapters {empty}; remove them from `adapters` or add rows")
    return groups


def has_adapter_column(rows: list[dict]) -> bool:
    return any(isinstance(row, dict) and ADAPTER_COLUMN in row for row in rows)


def run_concept_recipe(cfg: dict, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                       model_and_tokenizer=None) -> dict:
    """`run_recipe` for data with an `adapter` column: one adapter per name, trained in one pass, each saved in
    `output_dir/adapters/<name>`."""
    from ..models import load_model

    device = distributed.setup(cfg.get("device"))
    cfg = cfg if device is None or model_and_tokenizer is not None else {**cfg, "device": device}
    task = cfg["task"]
    if task not in CONCEPT_TASKS:
        raise ConfigError(f"a data column {ADAPTER_COLUMN!r} trains one adapter per name, for the tasks "
                          f"{', '.join(CONCEPT_TASKS)}; this recipe's task is {task!r}")
    if cfg.get("eval_data"):
        raise ConfigError("eval_data is not used when the data has an adapter column; evaluate each adapter folder "
                          "with `reftkit eval` afterwards")
    reft_cfg = reft_config(cfg)
    groups = split_rows(check_before_loading(cfg, model_and_tokenizer is None)["data"], cfg.get("adapters"),
                        str(cfg["data"]))
    out = Path(cfg["output_dir"])
    work = Path(distributed.on_main(lambda: str(run_folder(out, resume=resume, overwrite=overwrite))))
    if model_and_tokenizer is None:
        model_and_tokenizer = load_model(cfg["model"], **{k: cfg[k] for k in ("device", "dtype") if cfg.get(k)})
    model, tok = model_and_tokenizer
    reft = concept_model(model, reft_cfg, list(groups))
    data = {name: encode(tok, rows, task, chat=cfg.get("chat", True), max_length=int(cfg.get("max_length", 512)),
                         where=f"{cfg['data']} (adapter {name})") for name, rows in groups.items()}
    args = train_args(cfg)
    args.output_dir = str(work)
    args.progress = progress and args.progress
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    result = train_concepts(reft, data, args, task=task, pad_token_id=pad, resume=resume)
    trainable, total = reft.trainable_parameters()
    metrics = {"task": task, "model": cfg["model"], "steps": result["step"], "losses": result["losses"],
               "eval": [], "train_seconds": round(result["train_seconds"], 3),
               "examples_per_second": round(result["examples_per_second"], 3), "trainable_parameters": trainable,
               "total_parameters": total, "trainable_percent": 100 * trainable / total, "reft": reft_cfg.to_dict(),
               "adapter": str(out / "adapters"),
               "adapters": {name: {"folder": str(out / "adapters" / name), "examples": len(data[name]),
                                   "losses": result["adapter_losses"][name]} for name in groups}}

    def write() -> bool:
        for name in groups:
            reft.save_pretrained(work / "adapters" / name, adapter_name=name)
        write_file(work / "metrics.json", json.dumps(metrics, indent=2))
        if work != out:
            replace_folder(work, out)
        return True

    distributed.on_main(write)
    metrics["loss_plot"] = None
    return metrics
