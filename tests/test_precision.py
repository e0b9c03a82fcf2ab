"""bf16 where it is native: the 'auto' rule, the warning for a forced bf16 on an emulating device, and the
training loop's use of the decision."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import reftkit.precision as precision
import reftkit.reft.train as train_module
from reftkit.errors import ConfigError
from reftkit.models import build_tiny_model, build_tiny_tokenizer
from reftkit.precision import SlowPrecisionWarning, bf16_support, check_bf16_setting, resolve_bf16
from reftkit.reft.config import ReftConfig
from reftkit.reft.data import encode
from reftkit.reft.model import ReftModel
from reftkit.reft.train import TrainArgs, train


def _fake_cpu(monkeypatch, native: bool):
    reason = "a fake CPU with native bf16" if native else "a fake CPU that emulates bf16"
    monkeypatch.setattr(precision, "_cpu_bf16_support", lambda: (native, reason))


@pytest.mark.parametrize("value", [1, 0, "yes", "bf16", None, "Auto"])
def test_settings_other_than_auto_true_false_are_refused(value):
    with pytest.raises(ConfigError, match="'auto', true or false"):
        check_bf16_setting(value)
    with pytest.raises(ConfigError, match="train option bf16"):
        TrainArgs(bf16=value)


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_native_support_and_false_is_fp32(monkeypatch, native):
    _fake_cpu(monkeypatch, native)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither auto nor False ever warns
        assert resolve_bf16("auto", "cpu") is native
        assert resolve_bf16(False, "cpu") is False


def test_forced_bf16_on_an_emulating_cpu_runs_and_warns_with_the_reason(monkeypatch):
    _fake_cpu(monkeypatch, False)
    with pytest.warns(SlowPrecisionWarning, match="emulates bf16.*slower than fp32"):
        assert resolve_bf16(True, "cpu") is True
    _fake_cpu(monkeypatch, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_bf16(True, "cpu") is True


@pytest.mark.real_precision
def test_a_restricted_aten_code_path_is_not_native():
    """Below AVX-512 (ATEN_CPU_CAPABILITY=default), bf16 kernels are emulated whatever the processor has."""
    code = "from reftkit.precision import bf16_support; native, why = bf16_support('cpu'); print(native, '|', why)"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    native, _, reason = out.strip().partition(" | ")
    assert native == "False" and reason


@pytest.mark.real_precision
def test_the_real_decision_is_consistent_with_the_processor():
    native, reason = bf16_support("cpu")
    assert isinstance(native, bool) and reason
    flags = precision._cpu_flags()
    if native and flags and os.uname().machine == "x86_64":
        assert {"avx512_bf16", "amx_bf16"} & flags
    assert resolve_bf16("auto", "cpu") is native


@pytest.mark.parametrize("native", [True, False])
def test_training_runs_in_the_resolved_precision_and_records_it(monkeypatch, native):
    _fake_cpu(monkeypatch, native)
    tok = build_tiny_tokenizer()
    data = encode(tok, [{"prompt": "a cat says", "completion": " meow"}] * 4, "sft", chat=False)
    reft = ReftModel(build_tiny_model("llama"), ReftConfig(layers=[1], rank=2))
    dtypes = []
    real = train_module.task_loss

    def spy(r, batch, *a, **k):
        loss = real(r, batch, *a, **k)
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return loss

    monkeypatch.setattr(train_module, "task_loss", spy)
    result = train(reft, data, TrainArgs(max_steps=2, batch_size=4, progress=False), pad_token_id=tok.pad_token_id)
    assert result["args"]["bf16"] is native
    assert dtypes == [torch.bfloat16 if native else torch.float32] * 2
