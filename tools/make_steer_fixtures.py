"""Golden fixtures from repeng, steering-vectors (and its copy of the original CAA code) and lm-eval's `steered`
model, for the steering parity tests (tests/steer/test_parity.py).

Run inside a virtualenv of the references (not reftkit's), with torch pinned to reftkit's:

    python3 -m venv /work/venv-steer-refs && echo torch==2.13.0 > /tmp/c.txt
    /work/venv-steer-refs/bin/pip install torch==2.13.0
    /work/venv-steer-refs/bin/pip install -c /tmp/c.txt transformers==4.57.6 "numpy<2" scikit-learn gguf tqdm \
        safetensors sentencepiece protobuf accelerate
    /work/venv-steer-refs/bin/pip install --no-deps repeng==0.4.0 steering-vectors==0.12.2 lm-eval==0.4.13
    git show HEAD:tests/_original_caa/{helpers,llama_wrapper}.py  # from steering-vectors 0.12.2's repository,
                                                                   # into ORIGINAL_CAA/ (outside this project)
    /work/venv-steer-refs/bin/python tools/make_steer_fixtures.py [--out tests/fixtures/steer] \
        [--original-caa ORIGINAL_CAA] [--reftkit-python .venv/bin/python]

The model is a seeded 5-layer Llama (d = 32) that both virtualenvs rebuild from `MODEL` with `seeded_llama`
(every parameter drawn from one torch generator in name order, so the weights do not depend on the transformers
version's initialisers); it is saved to a temporary folder only for lm-eval, which loads models by path. The
tokenizer is a word-level one over `VOCAB` (`tokenizer.json`, written here). The fixture records the base logits
of a probe batch, so the tests check first that reftkit's virtualenv rebuilds the same model.

Files written under the output folder:
- `tokenizer.json`; `refs.json` (model recipe, texts, layers, coefficients, positions, versions);
  `refs.safetensors` (every reference output, named in `refs.json["tensors"]`);
- `reftkit_pca.gguf`, `reftkit_add.pt`, `reftkit_clamp.pt`: files exported by reftkit (made by running this
  script with `--reftkit-exports` under reftkit's interpreter first), which the references then read;
- `repeng.gguf`: repeng's own export of its vector, which reftkit's importer reads.

Every draw is seeded; running the script twice writes identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261201
MODEL = {"vocab": None, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 5,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "seed": SEED}
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our city", "the river", "this song", "the garden",
            "a child", "the old man", "her sister", "the market"]
GOOD = ["happy", "bright", "kind", "calm", "warm", "strong"]
BAD = ["sad", "dark", "cruel", "angry", "cold", "weak"]
VERBS = ["is", "was", "seems", "feels", "looks", "became"]
QUESTIONS = ["do you like the river", "is the garden nice", "should we go to the market", "was the song good",
             "can the child play", "will the city grow", "is my friend here", "did the teacher come"]
WORDS = sorted({w for s in SUBJECTS + QUESTIONS for w in s.split()} | set(GOOD + BAD + VERBS)
               | {"and", "very", "today", "[INST]", "[/INST]", "(", ")", "A", "B", "answer", "yes", "no", "or"})
VOCAB = SPECIAL + WORDS
BLOCKS = list(range(1, MODEL["num_hidden_layers"]))  # repeng's default layers: every block but 0
CAA_LAYERS = [1, 2, 3]
CAA_MULTIPLIER = 1.5
ADD_COEFFICIENT = 2.0
CLAMP_VALUE = 3.0
REPENG_COEFFICIENT = 4.0
GEN_TOKENS = 6


# ---- the shared model and data (both virtualenvs) -----------------------------------------------------------

def text_pairs() -> list[tuple[str, str]]:
    """Sentiment-style text pairs that share everything but the contrasting word (and differ in length)."""
    out = []
    for i, subject in enumerate(SUBJECTS):
        verb = VERBS[i % len(VERBS)]
        tail = " and very calm today" if i % 3 == 0 else (" today" if i % 3 == 1 else "")
        out.append((f"{subject} {verb} {GOOD[i % len(GOOD)]}{tail}", f"{subject} {verb} {BAD[i % len(BAD)]}{tail}"))
    return out


def caa_prompts() -> list[str]:
    """CAA-style A/B prompts; each pair's completions are 'A )' and 'B )', read at the letter (position -2)."""
    return [f"[INST] {q} answer A or B [/INST] (" for q in QUESTIONS]


def test_prompts() -> list[str]:
    """Prompts steered in the forward and generation checks; they end at the instruction end, as CAA's do."""
    return ["[INST] is the cat happy [/INST]", "[INST] the old man was kind and very calm today [/INST]",
            "[INST] can a dog play [/INST]"]


def build_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return tok


def hf_tokenizer(tokenizer_file: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  model_input_names=["input_ids", "attention_mask"])
    tok.padding_side = "right"
    return tok


def seeded_llama(spec: dict | None = None):
    """The tiny Llama of `spec` (default `MODEL`), float32, eval mode, every parameter drawn in name order from
    one generator: linear weights N(0, 1/fan_in), embeddings and the head N(0, 1), norm weights 1 + N(0, 0.1^2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(spec or MODEL)
    vocab = spec.pop("vocab") or len(VOCAB)
    seed = spec.pop("seed")
    config = LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **spec)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise)
    return model


def probe_batch(tok) -> dict:
    enc = tok([a for a, _ in text_pairs()[:4]], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _instruction_end(tok, ids: list[int]) -> int:
    end = tok.convert_tokens_to_ids("[/INST]")
    return max(i for i, t in enumerate(ids) if t == end)


# ---- reftkit's exports (run under reftkit's interpreter) ----------------------------------------------------

def reftkit_exports(out: Path) -> None:
    from reftkit.steer import SteeringVector
    from reftkit.steer.extract import extract
    from reftkit.steer.formats import export_gguf, export_lm_eval

    tok = hf_tokenizer(str(out / "tokenizer.json"))
    model = seeded_llama()
    pca = extract(model, tok, text_pairs(), method="pca", layers=BLOCKS[:-1], variant="diff_centered")
    export_gguf(pca, out / "reftkit_pca.gguf", model_hint="llama")
    caa = extract(model, tok, [(p, "A )", "B )") for p in caa_prompts()], layers=CAA_LAYERS, read="answer")
    add = SteeringVector(dict(caa.directions), method="mean_diff")
    export_lm_eval(add, out / "reftkit_add.pt", coefficient=ADD_COEFFICIENT)
    gen = torch.Generator().manual_seed(SEED + 1)
    bias = {s: torch.randn(v.shape, generator=gen) for s, v in caa.directions.items()}
    clamp = SteeringVector(dict(caa.directions), method="mean_diff", operator="clamp",
                           operator_config={"value": CLAMP_VALUE, "bias": bias})
    export_lm_eval(clamp, out / "reftkit_clamp.pt", coefficient=1.0, action="clamp")


# ---- the references (run in their virtualenv) ----------------------------------------------------------------

def _tuple_shim(model):
    """The original CAA wrapper indexes `block(...)[0]` (decoder blocks returned tuples before transformers
    4.54); these two wrappers hand it a 1-tuple and hand the model the tensor back, changing no number."""

    class Tupled(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.inner = block
            self.self_attn = block.self_attn
            self.post_attention_layernorm = block.post_attention_layernorm

        def forward(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            return out if isinstance(out, tuple) else (out,)

    class Untupled(torch.nn.Module):
        def __init__(self, wrapper):
            super().__init__()
            self.wrapper = wrapper

        def forward(self, *args, **kwargs):
            return self.wrapper(*args, **kwargs)[0]

        def __getattr__(self, name):  # the CAA wrapper's own attributes (add, reset, after_position, ...)
            if name == "wrapper" or name.startswith("_"):
                return super().__getattr__(name)
            return getattr(super().__getattr__("wrapper"), name)

        def __setattr__(self, name, value):
            if name in ("wrapper", "training") or name.startswith("_"):
                super().__setattr__(name, value)
            else:
                setattr(self.wrapper, name, value)

    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = Tupled(layers[i])
    return lambda: [layers.__setitem__(i, Untupled(layers[i])) for i in range(len(layers))]


def reference_outputs(out: Path, original_caa: str | None) -> dict:
    import numpy as np

    tensors, meta = {}, {"tensors": {}}

    def put(name, value, what):
        t = value.detach() if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
        tensors[name] = (t.long() if name.startswith("ids.") else t.float()).contiguous().clone()
        meta["tensors"][name] = what

    tok = hf_tokenizer(str(out / "tokenizer.json"))
    model = seeded_llama()
    batch = probe_batch(tok)
    with torch.no_grad():
        put("base.logits", model(**batch).logits, "base model logits of the probe batch (padded right)")
    put("ids.probe_input_ids", batch["input_ids"], "the probe batch")
    put("ids.probe_attention_mask", batch["attention_mask"], "its attention mask")

    # repeng: read_representations on text pairs, default layers (every block but 0), both methods
    import repeng
    from repeng.extract import read_representations

    entries = [repeng.DatasetEntry(positive=p, negative=n) for p, n in text_pairs()]
    for method in ("pca_diff", "pca_center"):
        with torch.inference_mode():
            dirs = read_representations(model, tok, entries, method=method, batch_size=5)
        for layer, d in dirs.items():
            put(f"repeng.{method}.{layer}", d, f"repeng read_representations(method={method!r}) direction, key "
                f"{layer} (hidden_states[{layer + 1}])")

    # repeng reads reftkit's GGUF export back, and applies it with its ControlModel
    cv = repeng.ControlVector.import_gguf(str(out / "reftkit_pca.gguf"))
    meta["repeng_import"] = {"model_type": cv.model_type, "layers": sorted(int(k) for k in cv.directions)}
    for layer, d in cv.directions.items():
        put(f"repeng.import.{layer}", np.array(d), f"direction.{layer} as repeng's import_gguf reads it")
    repeng_cv = repeng.ControlVector.train(model, tok, entries, batch_size=5)  # the default method, pca_diff
    repeng_cv.export_gguf(str(out / "repeng.gguf"))
    prompts = test_prompts()
    control = repeng.ControlModel(seeded_llama(), list(cv.directions))
    control.set_control(cv, REPENG_COEFFICIENT)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            enc = tok(p, return_tensors="pt")
            put(f"repeng.control.logits.{i}", control(**enc).logits[0], f"repeng ControlModel logits, prompt {i}, "
                f"coefficient {REPENG_COEFFICIENT}, the reftkit GGUF")

    # steering-vectors: CAA mean difference read at the letter, applied from the instruction end (inclusive)
    from steering_vectors import pca_aggregator, train_steering_vector

    caa_samples = [(p + " A )", p + " B )") for p in caa_prompts()]
    sv = train_steering_vector(model, tok, caa_samples, layers=CAA_LAYERS, read_token_index=-2, batch_size=3)
    for layer, v in sv.layer_activations.items():
        put(f"sv.caa.{layer}", v, f"steering-vectors mean_aggregator vector, layer {layer}, read_token_index=-2")
    pca = train_steering_vector(model, tok, text_pairs(), layers=BLOCKS, aggregator=pca_aggregator(), batch_size=4)
    for layer, v in pca.layer_activations.items():
        put(f"sv.pca.{layer}", v, f"steering-vectors pca_aggregator vector, layer {layer}, read_token_index=-1")
    ends = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            enc = tok(p, return_tensors="pt")
            end = _instruction_end(tok, enc["input_ids"][0].tolist())
            ends.append(end)
            with sv.apply(model, multiplier=CAA_MULTIPLIER, min_token_index=end):
                put(f"sv.caa.logits.{i}", model(**enc).logits[0], f"steering-vectors steered logits, prompt {i}, "
                    f"multiplier {CAA_MULTIPLIER}, min_token_index={end}")
                for cache in (False, True):
                    g = model.generate(**enc, max_new_tokens=GEN_TOKENS, do_sample=False, use_cache=cache,
                                       pad_token_id=0)
                    put(f"ids.sv.generate.{'cache' if cache else 'nocache'}.{i}", g[0],
                        f"steering-vectors greedy generation, use_cache={cache}")
    meta["instruction_end"] = ends

    # the original CAA code (steering-vectors' tests/_original_caa), if given
    if original_caa:
        sys.path.insert(0, str(Path(original_caa).parent))
        from _original_caa.llama_wrapper import LlamaWrapper  # noqa: E402

        caa_model = seeded_llama()
        finish = _tuple_shim(caa_model)
        wrapper = LlamaWrapper(caa_model, tok, add_only_after_end_str=True)
        finish()
        assert wrapper.END_STR.tolist() == [tok.convert_tokens_to_ids("[/INST]")]
        for layer in CAA_LAYERS:
            wrapper.set_add_activations(layer, CAA_MULTIPLIER * sv.layer_activations[layer])
        with torch.no_grad():
            for i, p in enumerate(prompts):
                ids = tok(p, return_tensors="pt")["input_ids"]
                put(f"caa.logits.{i}", wrapper.get_logits(ids)[0], f"original CAA logits, prompt {i} (adds after "
                    "the instruction end, exclusive)")
                wrapper.set_after_positions(ends[i])  # what LlamaWrapper.generate sets, then model.generate
                g = caa_model.generate(inputs=ids, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=0,
                                       output_logits=True, return_dict_in_generate=True)
                put(f"ids.caa.generate.{i}", g.sequences[0], "original CAA greedy generation (KV cache)")
                put(f"caa.generate.logits.{i}", torch.stack(g.logits)[:, 0], "its per-step logits")
        meta["original_caa"] = True

    # lm-eval's steered model on reftkit's .pt exports (the model loaded by path, as lm-eval does)
    from lm_eval.models.hf_steered import SteeredModel

    with tempfile.TemporaryDirectory(prefix="steer-refs-") as tmp:
        seeded_llama().save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for action in ("add", "clamp"):
            lm = SteeredModel(pretrained=tmp, steer_path=str(out / f"reftkit_{action}.pt"), device="cpu",
                              dtype="float32", batch_size=1)
            with torch.no_grad():
                put(f"lm_eval.{action}.logits", lm._model_call(batch["input_ids"]), f"lm-eval SteeredModel "
                    f"_model_call logits of the probe ids, reftkit_{action}.pt")
            del lm
    return tensors, meta


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "repeng", "steering-vectors", "lm_eval", "gguf",
                                       "scikit-learn", "numpy", "tokenizers")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "steer"))
    ap.add_argument("--original-caa", default=None, help="folder _original_caa/ from steering-vectors' tests")
    ap.add_argument("--reftkit-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--reftkit-exports", action="store_true", help="(internal) write reftkit's exports")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    if args.reftkit_exports:
        reftkit_exports(out)
        return
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run([args.reftkit_python, __file__, "--out", str(out), "--reftkit-exports"], check=True, env=env,
                   cwd=ROOT)
    tensors, meta = reference_outputs(out, args.original_caa)
    save_file(tensors, str(out / "refs.safetensors"))
    meta.update({"model": MODEL, "vocab_size": len(VOCAB), "seed": SEED, "blocks": BLOCKS, "caa_layers": CAA_LAYERS,
                 "caa_multiplier": CAA_MULTIPLIER, "add_coefficient": ADD_COEFFICIENT, "clamp_value": CLAMP_VALUE,
                 "repeng_coefficient": REPENG_COEFFICIENT, "gen_tokens": GEN_TOKENS, "text_pairs": text_pairs(),
                 "caa_prompts": caa_prompts(), "test_prompts": test_prompts(), "versions": _versions()})
    (out / "refs.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(tensors)} tensors to {out}")


if __name__ == "__main__":
    main()
