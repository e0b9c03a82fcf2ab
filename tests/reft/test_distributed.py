"""Training on 2 processes (gloo, `torchrun --standalone`) equals training in 1 process with the same global batch:
DDP, gradient accumulation, clipping, gathered evaluation, a rank without rows, several adapters of which one gets
no rows in later steps, FSDP2-sharded decoder layers; a rank-0 checkpoint resumes into 1 and into 2 processes;
mismatched ranks, a batch the world does not divide and a checkpoint of another world size are refused by name.

One torchrun launch runs every 2-process scenario (process start-up dominates); the 1-process references run here.
Every comparison also checks that each trained tensor moved and had a non-zero gradient at the first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from numerics import assert_close, assert_state_close
from safetensors.torch import load_file

from reftkit.errors import ConfigError
from reftkit.models import build_tiny_model
from reftkit.reft.config import ReftConfig
from reftkit.reft.model import ReftModel
from reftkit.reft.train import TrainArgs, train

from .test_concepts import CONFIG, ROWS, FirstGradients, args as concept_args, assert_trained

pytestmark = pytest.mark.numerics
TIMEOUT_S = 20  # the process-group timeout: a hung collective fails the test, never the suite

COMMON = textwrap.dedent(r'''
    import json, os, shutil, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from reftkit.models import build_tiny_model, build_tiny_tokenizer
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import TrainArgs, train

    ANIMALS = [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("owl", "hoot"), ("pig", "oink")]

    def examples(tok, n=9):
        return encode(tok, [{"prompt": p, "completion": c} for p, c in ANIMALS * 4][:n], "sft", chat=False)

    def fresh(dropout=0.0, layers=(1, 3)):
        return ReftModel(build_tiny_model("llama", initializer_range=0.2),
                         ReftConfig(layers=list(layers), rank=4, dropout=dropout))

    def run_args(out=None, **kw):
        base = dict(max_steps=5, batch_size=4, lr=1e-2, max_grad_norm=1.0, eval_every=2, save_every=2 if out else 0,
                    output_dir=str(out) if out else None, progress=False, bf16=False)
        return TrainArgs(**{**base, **kw})
''')

DRIVER = COMMON + textwrap.dedent(r'''
    import reftkit.reft.train as train_module
    from reftkit.errors import ConfigError
    from reftkit.reft import distributed as dist
    from reftkit.reft.concepts import concept_model, train_concepts
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    out = Path(sys.argv[1])
    rows = json.loads(sys.argv[2])
    dist.init("cpu")
    rank = dist.rank()
    tok = build_tiny_tokenizer()
    data = examples(tok)

    def record(name, reft, result, grads):
        if rank == 0:
            save_file({k: v.contiguous() for k, v in reft.state_dict().items() if k.startswith("adapters.")},
                      str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps({"losses": result["losses"], "eval": result["eval"],
                                                          "adapter_losses": result.get("adapter_losses"),
                                                          "grads": grads}))

    def first_grads(reft):
        seen = {}
        names = {id(p): n for n, p in reft.named_parameters()}
        def hook(opt, *_):
            for g in opt.param_groups:
                for p in g["params"]:
                    seen.setdefault(names[id(p)], 0.0 if p.grad is None else float(p.grad.abs().max()))
        return seen, register_optimizer_step_pre_hook(hook)

    def run(name, reft, fn):
        seen, handle = first_grads(reft)
        result = fn(reft)
        handle.remove()
        record(name, reft, result, seen)

    # DDP with clipping, evaluation and a last batch of one row (rank 1 has none)
    run("ddp", fresh(), lambda r: train(r, data, run_args(out / "ddp"), pad_token_id=tok.pad_token_id,
                                        eval_data=data[:5]))
    # gradient accumulation: 2 micro-batches of 2 rows (1 per rank) against one batch of 4 in one process
    run("accum", fresh(), lambda r: train(r, data, run_args(batch_size=2, grad_accum=2, max_steps=4),
                                          pad_token_id=tok.pad_token_id))
    # FSDP2 on the decoder layers, the interventions whole; rank 0 saves the ordinary adapter folder
    def sharded(r):
        metrics = train(r, data, run_args(out / "fsdp", fsdp=True), pad_token_id=tok.pad_token_id, eval_data=data[:5])
        if rank == 0:
            r.save_pretrained(out / "fsdp-adapter")
        return metrics
    run("fsdp", fresh(), sharded)
    # two adapters in one pass; "colours" has no rows after its 2 steps
    groups = {name: encode(tok, rs, "sft", chat=False) for name, rs in rows.items()}
    cfg = ReftConfig(layers=[1, 3], rank=4)
    concept_kw = dict(epochs=2, batch_size=4, lr=2e-2, max_grad_norm=0.5, warmup_ratio=0.25, weight_decay=0.01,
                      progress=False, bf16=False)
    run("concepts", concept_model(build_tiny_model("llama", initializer_range=0.2), cfg, list(rows)),
        lambda r: train_concepts(r, groups, TrainArgs(**concept_kw), pad_token_id=tok.pad_token_id))

    # a run stopped after its step-2 checkpoint, resumed here on 2 processes (and by the test on 1)
    real_save = train_module._save_checkpoint
    def save_then_stop(reft, opt, sched, state, directory):
        real_save(reft, opt, sched, state, directory)
        if state["step"] == 2:
            raise KeyboardInterrupt
    train_module._save_checkpoint = save_then_stop
    try:
        train(fresh(), data, run_args(out / "stopped"), pad_token_id=tok.pad_token_id, eval_data=data[:5])
    except KeyboardInterrupt:
        pass
    train_module._save_checkpoint = real_save
    if rank == 0:
        shutil.copytree(out / "stopped", out / "stopped-copy")
    dist.all_sum(0)  # the copy is complete before anyone resumes
    run("resumed", fresh(), lambda r: train(r, data, run_args(out / "stopped"), pad_token_id=tok.pad_token_id,
                                            eval_data=data[:5], resume=True))
    # a 2-process run with dropout: its checkpoint resumes only on 2 processes (checked by the test)
    train(fresh(dropout=0.1), data, run_args(out / "dropout", max_steps=2), pad_token_id=tok.pad_token_id)

    errors = {}
    def expect(name, fn):
        try:
            fn()
        except ConfigError as e:
            errors[name] = str(e)
    expect("batch", lambda: train(fresh(), data, run_args(batch_size=3), pad_token_id=tok.pad_token_id))
    expect("mismatch", lambda: train(fresh(), data, run_args(lr=1e-2 * (1 + rank)), pad_token_id=tok.pad_token_id))
    expect("world", lambda: train(fresh(dropout=0.1), data, run_args(out / "one-process", max_steps=2),
                                  pad_token_id=tok.pad_token_id, resume=True))
    (out / f"errors.rank{rank}.json").write_text(json.dumps(errors))
    dist.close()
''')


def torchrun(script: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REFTKIT_DIST_TIMEOUT": str(TIMEOUT_S)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def exec_common() -> dict:
    namespace: dict = {}
    exec(compile(COMMON, "<common>", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def two(tmp_path_factory, tok):
    """The 2-process runs (one launch), after a 1-process dropout checkpoint for the world-size check."""
    out = tmp_path_factory.mktemp("two")
    ns = exec_common()
    train(ns["fresh"](dropout=0.1), ns["examples"](tok), ns["run_args"](out / "one-process", max_steps=2),
          pad_token_id=tok.pad_token_id)
    script = out / "driver.py"
    script.write_text(DRIVER)
    proc = torchrun(script, str(out), json.dumps(ROWS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, ns


def result(out: Path, name: str):
    return load_file(str(out / f"{name}.safetensors")), json.loads((out / f"{name}.json").read_text())


def adapters_of(reft: ReftModel) -> dict:
    return {k: v for k, v in reft.state_dict().items() if k.startswith("adapters.")}


def one_process(ns, tok, name_of_run=None, **kw):
    """The 1-process reference of a driver run, with its first-step gradients."""
    reft = ns["fresh"]()
    before = {k: v.clone() for k, v in adapters_of(reft).items()}
    with FirstGradients() as grads:
        metrics = train(reft, ns["examples"](tok), ns["run_args"](**kw), pad_token_id=tok.pad_token_id,
                        eval_data=ns["examples"](tok)[:5] if kw.get("eval_every", 2) else None)
    return reft, before, grads, metrics


def check_two_equals_one(out, name, reference):
    reft, before, grads, metrics = reference
    weights, info = result(out, name)
    assert_close(torch.tensor(info["losses"]), torch.tensor(metrics["losses"]), msg=name)
    assert_state_close(weights, adapters_of(reft))
    assert_trained(before, weights, grads, [(n, p) for n, p in reft.named_parameters() if p.requires_grad])
    assert all(info["grads"][n] > 0 for n, p in reft.named_parameters() if p.requires_grad), info["grads"]
    return info, metrics


@pytest.fixture(scope="module")
def plain_reference(two, tok):
    return one_process(two[1], tok)


def test_ddp_with_clipping_and_evaluation_equals_one_process(two, plain_reference):
    info, metrics = check_two_equals_one(two[0], "ddp", plain_reference)
    assert len(info["losses"]) == 5 and [e[0] for e in info["eval"]] == [2, 4, 5]
    assert_close(torch.tensor(info["eval"]), torch.tensor(metrics["eval"]))


def test_gradient_accumulation_on_two_processes_equals_one_large_batch(two, tok):
    reference = one_process(two[1], tok, batch_size=4, grad_accum=1, max_steps=4)
    check_two_equals_one(two[0], "accum", reference)


def test_fsdp2_sharded_layers_equal_one_process_and_save_an_ordinary_adapter(two, plain_reference, tok):
    out = two[0]
    info, metrics = check_two_equals_one(out, "fsdp", plain_reference)
    assert_close(torch.tensor(info["eval"]), torch.tensor(metrics["eval"]))
    loaded = ReftModel.from_pretrained(build_tiny_model("llama", initializer_range=0.2), out / "fsdp-adapter")
    assert_state_close(loaded.adapter_state_dict("default"), plain_reference[0].adapter_state_dict("default"))
    resumed = two[1]["fresh"]()  # the rank-0 checkpoint of the sharded run loads into one plain process
    train(resumed, two[1]["examples"](tok), two[1]["run_args"](out / "fsdp"), pad_token_id=tok.pad_token_id,
          resume=True)
    assert_state_close(adapters_of(resumed), result(out, "fsdp")[0])


def test_two_adapters_one_without_rows_in_later_steps_equal_one_process(two, tok):
    from reftkit.reft.concepts import concept_model, train_concepts
    from reftkit.reft.data import encode

    data = {name: encode(tok, rows, "sft", chat=False) for name, rows in ROWS.items()}
    reft = concept_model(build_tiny_model("llama", initializer_range=0.2), ReftConfig(**CONFIG), list(ROWS))
    before = {k: v.clone() for k, v in adapters_of(reft).items()}
    with FirstGradients() as grads:
        metrics = train_concepts(reft, data, concept_args(), pad_token_id=tok.pad_token_id)
    weights, info = result(two[0], "concepts")
    assert [len(info["adapter_losses"][n]) for n in ROWS] == [4, 2]
    for name in ROWS:
        assert_close(torch.tensor(info["adapter_losses"][name]), torch.tensor(metrics["adapter_losses"][name]))
    assert_state_close(weights, adapters_of(reft))
    assert_trained(before, weights, grads, [(n, p) for n, p in reft.named_parameters() if p.requires_grad])


def test_a_rank0_checkpoint_resumes_into_one_and_into_two_processes(two, plain_reference, tok):
    out, ns = two
    reft, _, _, metrics = plain_reference
    weights, info = result(out, "resumed")  # resumed on 2 processes
    assert_close(torch.tensor(info["losses"]), torch.tensor(metrics["losses"]))
    assert_state_close(weights, adapters_of(reft))
    one = ns["fresh"]()  # resumed on 1 process from the same checkpoint
    resumed = train(one, ns["examples"](tok), ns["run_args"](out / "stopped-copy"), pad_token_id=tok.pad_token_id,
                    eval_data=ns["examples"](tok)[:5], resume=True)
    assert_close(torch.tensor(resumed["losses"]), torch.tensor(metrics["losses"]))
    assert_state_close(adapters_of(one), adapters_of(reft))


def test_bad_distributed_input_names_what_to_change(two, tok):
    out, ns = two
    errors = [json.loads((out / f"errors.rank{r}.json").read_text()) for r in (0, 1)]
    assert errors[0] == errors[1]  # every rank raises, none is left in a collective
    e = errors[0]
    assert "batch_size 3 is not a multiple of the 2 processes" in e["batch"] and "set batch_size to a multiple of 2" \
        in e["batch"]
    assert 'rank 1 differs from rank 0 in train.lr (rank 0: {"train.lr": 0.01}, rank 1: {"train.lr": 0.02})' \
        in e["mismatch"]
    assert "written by a run of 1 process(es) and this run has 2" in e["world"] and \
        "torchrun --nproc_per_node 1" in e["world"]
    with pytest.raises(ConfigError, match=r"written by a run of 2 process\(es\) and this run has 1.*"
                                          r"--nproc_per_node 2"):
        train(ns["fresh"](dropout=0.1), ns["examples"](tok), ns["run_args"](out / "dropout", max_steps=2),
              pad_token_id=tok.pad_token_id, resume=True)
