"""Many adapters in one pass: each adapter of a run that routes every example to its own adapter ends as the adapter
trained alone on its own data (same seed, same batches), including one whose steps end early and gets no rows
afterwards; `reftkit train` with an `adapter` column writes one adapter folder per name; bad names are refused."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from numerics import assert_close, assert_state_close
from torch.optim.optimizer import register_optimizer_step_pre_hook

from reftkit.errors import ConfigError, DataError
from reftkit.models import build_tiny_model, load_model
from reftkit.reft.concepts import concept_model, split_rows, train_concepts
from reftkit.reft.config import ReftConfig
from reftkit.reft.data import encode
from reftkit.reft.model import ReftModel
from reftkit.reft.train import TrainArgs, train

from .conftest import ANIMALS, run_cli

pytestmark = pytest.mark.numerics

CONFIG = dict(layers=[1, 3], rank=4)
ROWS = {"animals": [{"prompt": p, "completion": c} for p, c in ANIMALS] * 2,  # 8 rows: 4 steps over 2 epochs
        "colours": [{"prompt": "sky", "completion": "blue"}, {"prompt": "grass", "completion": "green"},
                    {"prompt": "snow", "completion": "white"}, {"prompt": "coal", "completion": "black"}]}  # 2 steps


def args(**kw):
    base = dict(epochs=2, batch_size=4, lr=2e-2, max_grad_norm=0.5, warmup_ratio=0.25, weight_decay=0.01,
                progress=False, bf16=False)
    return TrainArgs(**{**base, **kw})


class FirstGradients:
    """The largest gradient of every parameter at the first optimizer step (after accumulation, before it)."""

    def __init__(self):
        self.seen: dict[int, float] = {}

    def __enter__(self):
        def hook(opt, *_):
            for g in opt.param_groups:
                for p in g["params"]:
                    self.seen.setdefault(id(p), 0.0 if p.grad is None else float(p.grad.abs().max()))

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def assert_trained(before: dict, after: dict, grads: FirstGradients, params) -> None:
    """Every tensor moved from its start and had a non-zero gradient: the equality is not one of untouched tensors."""
    for key in before:
        assert float((after[key] - before[key]).abs().max()) > 1e-4, f"{key} did not move"
    for name, p in params:
        assert grads.seen.get(id(p), 0.0) > 0, f"{name} had no gradient at the first step"


@pytest.fixture(scope="module")
def runs(tok):
    data = {name: encode(tok, rows, "sft", chat=False) for name, rows in ROWS.items()}
    together = concept_model(build_tiny_model("llama", initializer_range=0.2), ReftConfig(**CONFIG), list(ROWS))
    before = {n: {k: v.clone() for k, v in together.adapter_state_dict(n).items()} for n in ROWS}
    with FirstGradients() as grads:
        result = train_concepts(together, data, args(), pad_token_id=tok.pad_token_id)
    alone = {}
    for name in ROWS:
        reft = ReftModel(build_tiny_model("llama", initializer_range=0.2), ReftConfig(**CONFIG))
        alone[name] = (reft, train(reft, data[name], args(), pad_token_id=tok.pad_token_id))
    return together, before, grads, result, alone


def test_each_adapter_equals_the_adapter_trained_alone_on_its_data(runs):
    together, before, grads, result, alone = runs
    assert result["step"] == 4 and [len(result["adapter_losses"][n]) for n in ROWS] == [4, 2]  # colours ends early
    for name in ROWS:
        reft, solo = alone[name]
        assert_close(torch.tensor(result["adapter_losses"][name]), torch.tensor(solo["losses"]), msg=name)
        assert_state_close(together.adapter_state_dict(name), reft.adapter_state_dict("default"))
        assert_trained(before[name], together.adapter_state_dict(name), grads,
                       [(n, p) for n, p in together.named_parameters() if n.startswith(f"adapters.{name}.")])
    assert_close(torch.tensor(result["losses"][:2]),
                 torch.tensor(result["adapter_losses"]["animals"][:2]) + torch.tensor(result["adapter_losses"]["colours"]))


def test_the_data_must_name_adapters_the_model_has(tok):
    reft = concept_model(build_tiny_model("llama"), ReftConfig(**CONFIG), ["a"])
    data = encode(tok, ROWS["colours"], "sft", chat=False)
    with pytest.raises(ConfigError, match=r"adapters \['b'\] that the model does not have; its adapters are \['a'\]"):
        train_concepts(reft, {"a": data, "b": data}, args())
    with pytest.raises(ConfigError, match="supports the tasks sft, dpo"):
        train_concepts(reft, {"a": data}, args(), task="classification")
    with pytest.raises(ConfigError, match="modules_to_save"):
        concept_model(build_tiny_model("llama"), ReftConfig(**CONFIG, modules_to_save=["lm_head"]), ["a"])


def test_split_rows_names_the_row_and_the_fix():
    rows = [{"prompt": "a", "completion": "b", "adapter": "x"}, {"prompt": "a", "completion": "b", "adapter": "y"}]
    assert list(split_rows(rows, None)) == ["x", "y"]
    with pytest.raises(DataError, match=r"data, row 2: adapter 'y' is not one of the recipe's adapters \['x'\]"):
        split_rows(rows, ["x"])
    with pytest.raises(DataError, match="row 1: missing field 'adapter'"):
        split_rows([{"prompt": "a", "completion": "b"}], None)
    with pytest.raises(DataError, match=r"no row names the adapters \['z'\]"):
        split_rows(rows, ["x", "y", "z"])


def test_reftkit_train_with_an_adapter_column_writes_one_folder_per_adapter(tmp_path, capsys, tok):
    model, _ = load_model("tiny-llama")  # the recipe's model
    together = concept_model(model, ReftConfig(**CONFIG), list(ROWS))
    train_concepts(together, {name: encode(tok, rows, "sft", chat=False) for name, rows in ROWS.items()}, args(),
                   pad_token_id=tok.pad_token_id)
    rows = [dict(r, adapter=name) for name in ROWS for r in ROWS[name]]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {"model": "tiny-llama", "data": "mixed.jsonl", "chat": False, "max_length": 64, "adapters": list(ROWS),
              "reft": CONFIG, "train": {k: v for k, v in vars(args()).items() if k in
                                        ("epochs", "batch_size", "lr", "max_grad_norm", "warmup_ratio",
                                         "weight_decay", "bf16")}}
    (tmp_path / "concepts.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli(capsys, "train", tmp_path / "concepts.yaml", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert sorted(metrics["adapters"]) == sorted(ROWS) and metrics["steps"] == 4
    for name in ROWS:
        folder = tmp_path / "runs" / "concepts" / "adapters" / name
        assert metrics["adapters"][name]["folder"] == str(folder)
        loaded = ReftModel.from_pretrained(load_model("tiny-llama")[0], folder)
        assert_state_close(loaded.adapter_state_dict("default"), together.adapter_state_dict(name))
    rows[3]["adapter"] = "shapes"
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    code, _, err = run_cli(capsys, "train", tmp_path / "concepts.yaml", "--overwrite")
    assert code == 2 and "row 4: adapter 'shapes' is not one of the recipe's adapters" in err


def test_a_stopped_concept_run_resumes_to_the_same_adapters(tok, tmp_path, monkeypatch, runs):
    from .conftest import interrupt_after

    together, result = runs[0], runs[3]
    data = {name: encode(tok, rows, "sft", chat=False) for name, rows in ROWS.items()}

    def model():
        return concept_model(build_tiny_model("llama", initializer_range=0.2), ReftConfig(**CONFIG), list(ROWS))

    run_args = args(save_every=1, output_dir=str(tmp_path / "run"))
    interrupt_after(monkeypatch, 3)  # after the last step of colours: only animals trains on
    with pytest.raises(KeyboardInterrupt):
        train_concepts(model(), data, run_args, pad_token_id=tok.pad_token_id)
    monkeypatch.undo()
    resumed = model()
    metrics = train_concepts(resumed, data, run_args, pad_token_id=tok.pad_token_id, resume=True)
    for name in ROWS:
        assert_close(torch.tensor(metrics["adapter_losses"][name]), torch.tensor(result["adapter_losses"][name]))
        assert_state_close(resumed.adapter_state_dict(name), together.adapter_state_dict(name))
