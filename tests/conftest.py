"""Shared fixtures: tiny seeded models (built once per session) and the built-in real models."""

from __future__ import annotations

import pytest
import torch

from reftkit.models import TINY_FAMILIES, build_tiny_model, build_tiny_tokenizer, load_model

@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    """Tests run on one torch thread: tiny models' operations are too small for a second thread to help, and on a
    shared machine two threads spin-waiting on each other cost more than the work. A module that sets
    `KEEP_THREADS = True` (real-model timing-sensitive tests) keeps torch's default."""
    if getattr(request.module, "KEEP_THREADS", False):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fp32_unless_asked(request, monkeypatch):
    """`bf16="auto"` (the training default) means bf16 autocast on processors with native bf16 and fp32 elsewhere;
    the suite pins "auto" to fp32 so that a test's numbers do not depend on the processor. Tests of the detection
    itself are marked `real_precision`."""
    if request.node.get_closest_marker("real_precision"):
        return
    import reftkit.precision as precision

    monkeypatch.setattr(precision, "_cpu_bf16_support", lambda: (False, "the test suite pins bf16='auto' to fp32"))


DECODER_FAMILIES = [family for family, (_, kind, _) in TINY_FAMILIES.items() if kind == "causal-lm"]
ENCODER_FAMILIES = [family for family, (_, kind, _) in TINY_FAMILIES.items() if kind == "encoder"]


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model(family)` -> (model, tokenizer), built once per family per session (seed 0)."""
    built: dict[str, tuple] = {}

    def get(family: str):
        if family not in built:
            kind = TINY_FAMILIES[family][1]
            built[family] = (build_tiny_model(family), build_tiny_tokenizer(kind))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The built-in SmolLM2-135M-Instruct from the default cache (the first run converts the GGUF once)."""
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def minilm():
    return load_model("minilm-l6")
