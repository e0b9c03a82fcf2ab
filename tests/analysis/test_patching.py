"""Activation patching, ablation and path patching against naive one-forward-per-site references."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from numerics import assert_close

from reftkit.analysis.patching import (KLToClean, LogitDifference, TargetProbability, ablation,
                                       activation_patching)
from reftkit.analysis.path_patching import path_patching
from reftkit.analysis.replay import Replay, cache_argument
from reftkit.errors import DataError, ReftkitError, SiteError

from .reference import patched_logits, record

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

COMPONENTS = ("block_output", "attention_output", "mlp_output")
FAMILIES = ["llama", "gpt2", "gpt-neox"]


def pairs(P=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 260, (P, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:3] = torch.randint(3, 260, (P, 2), generator=g)
    return clean, corrupted


def logit_diff(logits):
    return torch.stack([logits[0, 5] - logits[0, 7], logits[1, 6] - logits[1, 8]])


def naive_grid(model, base, source, metric_fn, components=COMPONENTS, window=1):
    n_layers = model.config.num_hidden_layers
    acts, _ = record(model, source, [f"L{l}.{c}" for c in components for l in range(n_layers)])
    T = base.shape[1]
    out = torch.empty(base.shape[0], len(components), n_layers, T)
    for ci, c in enumerate(components):
        w = 1 if c == "block_output" else window
        for l in range(n_layers):
            layers = range(max(0, l - w // 2), min(n_layers, l - w // 2 + w))
            for t in range(T):
                patches = [(f"L{j}.{c}", t, acts[f"L{j}.{c}"]) for j in layers]
                out[:, ci, l, t] = metric_fn(patched_logits(model, base, patches))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_denoising_equals_naive_hooks(tiny_model, family):
    model, _ = tiny_model(family)
    clean, corrupted = pairs()
    want = naive_grid(model, corrupted, clean, logit_diff)
    for method in ("engine", "replay"):
        result = activation_patching(model, clean, corrupted, LogitDifference([5, 6], [7, 8]), components=COMPONENTS,
                                     method=method, chunk_size=20)
        assert result.effects.shape == (2, 3, 4, 6)
        assert_close(result.effects, want, msg=str(method))
    assert_close(result.clean, logit_diff(record(model, clean, [])[1]))
    assert_close(result.corrupted, logit_diff(record(model, corrupted, [])[1]))
    # positions before the first corrupted token are untouched by the corruption: patching them changes nothing
    assert_close(result.effects[..., 0], result.corrupted[:, None, None].expand(-1, 3, 4))


def test_noising_and_windows_equal_naive_hooks(tiny_llama):
    model, _ = tiny_llama
    clean, corrupted = pairs(seed=1)
    for method in ("engine", "replay"):
        result = activation_patching(model, clean, corrupted, LogitDifference([5, 6], [7, 8]), direction="noise",
                                     components=("mlp_output", "attention_output"), window=3, method=method)
        want = naive_grid(model, clean, corrupted, logit_diff, components=("mlp_output", "attention_output"),
                          window=3)
        assert_close(result.effects, want, msg=str(method))
    # normalised: patching the last layer's block output at the last position moves the whole way to the source
    full = activation_patching(model, clean, corrupted, LogitDifference([5, 6], [7, 8]), direction="noise")
    assert_close(full.normalized()[:, 0, -1, -1], torch.ones(2))


def test_metrics_probability_and_kl(tiny_llama):
    model, _ = tiny_llama
    clean, corrupted = pairs(seed=2)
    prob = activation_patching(model, clean, corrupted, TargetProbability([9, 10]), layers=[3])
    kl = activation_patching(model, clean, corrupted, KLToClean(), layers=[3])
    _, clean_logits = record(model, clean, [])
    p = torch.softmax(clean_logits, -1)
    assert_close(prob.clean, torch.stack([p[0, 9], p[1, 10]]))
    # restoring the last block's output at the last position restores the clean distribution exactly
    assert_close(prob.effects[:, 0, 0, -1], prob.clean)
    assert_close(kl.effects[:, 0, 0, -1], torch.zeros(2), scale=1.0)  # KL: log-probabilities of order one
    assert bool((kl.corrupted > 0).all())
    assert_close(kl.clean, torch.zeros(2), scale=1.0)


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_ablation_equals_naive_hooks(tiny_model, kind):
    model, _ = tiny_model("gpt2")
    ids = torch.randint(3, 260, (3, 5), generator=torch.Generator().manual_seed(3))
    result = ablation(model, ids, TargetProbability(11), kind=kind, components=("mlp_output",), seed=4)
    acts, _ = record(model, ids, [f"L{l}.mlp_output" for l in range(4)])
    gen = torch.Generator().manual_seed(4)
    other = (torch.arange(3) + torch.randint(1, 3, (3,), generator=gen)) % 3
    assert bool((other != torch.arange(3)).all())
    for l in range(4):
        a = acts[f"L{l}.mlp_output"]
        value = {"zero": torch.zeros_like(a), "mean": a.mean(0, keepdim=True).expand_as(a), "resample": a[other]}[kind]
        for t in range(5):
            want = torch.softmax(patched_logits(model, ids, [(f"L{l}.mlp_output", t, value)]), -1)[:, 11]
            assert_close(result.effects[:, 0, l, t], want)
    assert result.corrupted is None
    with pytest.raises(ReftkitError, match="delta"):
        result.normalized()


def test_path_patching_equals_naive_hooks(tiny_model):
    model, _ = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randint(3, 260, (2, 6), generator=g), torch.randint(3, 260, (2, 6), generator=g)
    writers = [f"L{l}.{c}" for l in range(4) for c in ("attention_output", "mlp_output")]
    C, _ = record(model, clean, writers)
    X, _ = record(model, corrupted, writers)

    def naive(sender, receiver):
        stop = writers.index(receiver) if receiver else len(writers)
        patches = [(sender, None, X[sender])] + [(w, None, C[w]) for w in writers[writers.index(sender) + 1: stop]]
        if receiver is None:
            return logit_diff(patched_logits(model, clean, patches))
        seen = {}
        from .reference import _get
        from reftkit.sites import resolve_site
        rs = resolve_site(model, receiver)
        h = rs.module.register_forward_hook(lambda m, a, o: seen.__setitem__("v", _get(o, rs.index).clone()))
        patched_logits(model, clean, patches)
        h.remove()
        return logit_diff(patched_logits(model, clean, [(receiver, None, seen["v"])]))

    senders, receivers = ["L0.attention_output", "L1.mlp_output"], ["L2.mlp_output", "L3.attention_output"]
    result = path_patching(model, clean, corrupted, LogitDifference([5, 6], [7, 8]), senders, receivers)
    for i, s in enumerate(senders):
        for j, r in enumerate(receivers):
            assert_close(result.effects[:, i, j], naive(s, r))
    direct = path_patching(model, clean, corrupted, LogitDifference([5, 6], [7, 8]), senders)
    for i, s in enumerate(senders):
        assert_close(direct.effects[:, i, 0], naive(s, None))
    with pytest.raises(SiteError, match="does not come after"):
        path_patching(model, clean, corrupted, LogitDifference(5, 7), ["L2.mlp_output"], ["L1.attention_output"])


def test_path_patching_head_sender(tiny_llama):
    model, _ = tiny_llama
    clean, corrupted = pairs(seed=6)
    metric = LogitDifference([5, 6], [7, 8])
    heads = path_patching(model, clean, corrupted, metric, [f"L1.H{h}.head_attention_value_output" for h in range(4)])
    whole = path_patching(model, clean, corrupted, metric, ["L1.attention_output"])
    assert heads.effects.shape == (2, 4, 1)
    # one head's path differs from the clean run, and no head alone equals the whole layer's path
    assert not torch.allclose(heads.effects[:, :, 0], heads.clean[:, None].expand(-1, 4))
    assert not torch.allclose(whole.effects[:, 0, 0], heads.clean)


def test_bad_inputs_raise_typed_errors(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(DataError, match="different lengths"):
        activation_patching(model, ["The cat sat", "A dog"], ["The cat sat", "A cow"], KLToClean(),
                            tokenizer=tokenizer)
    with pytest.raises(DataError, match="same token length"):
        activation_patching(model, torch.ones(1, 5, dtype=torch.long), torch.ones(1, 6, dtype=torch.long), "kl")
    with pytest.raises(DataError, match="one-token target"):
        TargetProbability(" Paris", tokenizer=tokenizer)
    with pytest.raises(DataError, match="out of range"):
        activation_patching(model, *pairs(), "kl", layers=[7])
    with pytest.raises(SiteError, match="unknown component"):
        activation_patching(model, *pairs(), "kl", components=("not_a_component",))
    with pytest.raises(DataError, match="at least two prompts"):
        ablation(model, torch.ones(1, 4, dtype=torch.long), "kl", kind="mean")
    model.train()
    try:
        with pytest.raises(ReftkitError, match="model.eval"):
            activation_patching(model, *pairs(), "kl")
    finally:
        model.eval()


def test_replay_falls_back_or_refuses(tiny_llama):
    model, _ = tiny_llama
    clean, corrupted = pairs()
    # attention_value_output is read at a module's input: the replay does not apply and the engine is used
    with pytest.raises(ReftkitError, match="method='engine'"):
        Replay.build(model, corrupted, ["attention_value_output"], required=True)
    assert Replay.build(model, corrupted, ["attention_value_output"]) is None
    result = activation_patching(model, clean, corrupted, "kl", components=("attention_value_output",), layers=[1])
    assert result.effects.shape == (2, 1, 1, 6)
    # KL is a sum of differences of log-probabilities of order one: judged at that scale, not at its own
    assert_close(result.effects[:, 0, 0, 0], result.corrupted, scale=1.0)  # before the corruption
    assert not torch.allclose(result.effects[:, 0, 0, 2], result.corrupted)
    assert Replay.build(model, corrupted, ["block_output", "mlp_output"]) is not None


def test_replay_refuses_post_processed_logits(tiny_model):
    gemma, _ = tiny_model("gemma2")  # final logit softcapping happens outside the decoder
    with pytest.raises(ReftkitError, match="final_logit_softcapping"):
        Replay.build(gemma, pairs()[1], ["block_output"], required=True)
    result = activation_patching(gemma, *pairs(), "kl", layers=[1], positions=[2, 5])
    assert result.effects.shape == (2, 1, 1, 2) and bool((result.effects >= 0).all())


def test_patching_plot_written(tiny_llama, tmp_path):
    pytest.importorskip("matplotlib")
    model, _ = tiny_llama
    result = activation_patching(model, *pairs(), LogitDifference([5, 6], [7, 8]), components=("block_output",))
    path = result.save_plot(tmp_path / "patching.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["patching.png"]


def test_replay_passes_the_cache_under_the_name_the_forward_declares(tiny_llama):
    """transformers renamed `past_key_values` to `cache` and warns (FutureWarning) on the old name; the replay picks
    the name from the forward's signature, so it works on both and warns on neither."""
    model, _ = tiny_llama
    declared = inspect.signature(model.forward).parameters
    assert cache_argument(model) == ("cache" if "cache" in declared else "past_key_values")

    class OlderDecoder(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_argument(OlderDecoder()) == "past_key_values"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        result = activation_patching(model, *pairs(), "kl", components=("block_output",), method="replay")
    assert result.effects.shape == (2, 1, 4, 6) and bool(torch.isfinite(result.effects).all())
