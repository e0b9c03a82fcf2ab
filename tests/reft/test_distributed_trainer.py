"""`ReftTrainer` under `torchrun --nproc_per_node 2` on a machine without GPUs: without `use_cpu=True` every process
sees a world of size 1 and would train alone, so each one refuses with a `ConfigError`; with `use_cpu=True` the
processes join one gloo group and end with the same, trained adapter."""

from __future__ import annotations

import json
import textwrap

import pytest

from .test_distributed import torchrun

SCRIPT = textwrap.dedent(r'''
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from transformers import TrainingArguments
    from reftkit.errors import ConfigError
    from reftkit.models import build_tiny_model, build_tiny_tokenizer
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.trainer import ReftTrainer

    out = Path(sys.argv[1])
    tok = build_tiny_tokenizer()
    data = encode(tok, [{"prompt": p, "completion": c} for p, c in [("cat", "meow"), ("dog", "woof")] * 4], "sft",
                  chat=False)

    def trainer(use_cpu):
        reft = ReftModel(build_tiny_model("llama", initializer_range=0.2), ReftConfig(layers=[1], rank=2))
        args = TrainingArguments(output_dir=str(out / f"run-{use_cpu}"), use_cpu=use_cpu, max_steps=3,
                                 per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], save_strategy="no",
                                 disable_tqdm=True, logging_strategy="no")
        return reft, ReftTrainer(reft, args, train_dataset=data, pad_token_id=tok.pad_token_id)

    report = {}
    try:
        trainer(False)
    except ConfigError as e:
        report["refused"] = str(e)
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    reft, t = trainer(True)
    before = {k: v.clone() for k, v in reft.adapter_state_dict("default").items()}
    t.train()
    after = reft.adapter_state_dict("default")
    report["world"] = t.args.world_size
    report["rank"] = t.args.process_index
    report["moved"] = min(float((after[k] - before[k]).abs().max()) for k in before)
    report["weights"] = {k: v.reshape(-1).tolist() for k, v in after.items()}
    (out / f"rank{t.args.process_index}.json").write_text(json.dumps(report))
''')


def test_the_launcher_trap_is_refused_and_use_cpu_trains_one_synchronised_run(tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "trainer_driver.py"
    script.write_text(SCRIPT)
    proc = torchrun(script, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, report in enumerate(reports):
        assert "the launcher started 2 processes (WORLD_SIZE=2)" in report["refused"]
        assert "TrainingArguments(use_cpu=True)" in report["refused"]
        assert report["world"] == 2 and report["rank"] == r
        assert report["moved"] > 1e-4
    assert reports[0]["weights"] == reports[1]["weights"]  # one synchronised run, not two lone ones
