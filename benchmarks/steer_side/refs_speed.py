"""Reference side of benchmarks/steer_speed.py: repeng 0.4.0 and steering-vectors 0.12.2 on SmolLM2-135M-Instruct.

Runs in the references' virtualenv (transformers 4.57, see tools/make_steer_fixtures.py for its recipe):
`python refs_speed.py GGUF_DIR JOB.json`, where JOB.json (written by steer_speed.py) holds the contrast pairs, the
layers, the generation prompt, the number of repeats and the thread count. Prints one JSON line.

Measured, each after one warm-up call, median of the repeats:
- extraction of a vector at every requested layer from the pairs, with each library's own entry point and
  defaults: repeng `read_representations` (pca_diff, batches of 32), steering-vectors `train_steering_vector`
  (mean_aggregator) at its default batch size of 1 and at reftkit's default of 16;
- greedy generation (min = max new tokens) of one chat prompt: plain, under repeng's ControlModel (all layers of
  the vector, every position) and under steering-vectors' `apply` (every position), in interleaved rounds.

The model is loaded the way shared/bench/anchor_pyreft.py loads it (GGUF dequantised to float32, the tied head tied
by hand); the tokenizer adds no BOS and pads with `<|im_end|>` on the right, as reftkit's does, so both sides read
the same tokens (the token count is reported for the check).
"""

import json
import os
import statistics
import sys
import time

import torch
import transformers

job = json.loads(open(sys.argv[2]).read())
torch.manual_seed(0)
torch.set_num_threads(int(job["threads"]))
gguf_dir, gguf_file = sys.argv[1], "SmolLM2-135M-Instruct.Q4_1.gguf"
t0 = time.perf_counter()
if os.path.exists(os.path.join(gguf_dir, "config.json")):  # steer_speed.py --smoke: a tiny Hugging Face folder
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(gguf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, torch_dtype=torch.float32)
else:
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file,
                                                              torch_dtype=torch.float32)
    model.lm_head.weight = model.model.embed_tokens.weight
model.eval()
load_s = time.perf_counter() - t0
tok.model_max_length = 2048
tok.pad_token = "<|im_end|>"
tok.padding_side = "right"
if getattr(tok, "add_bos_token", False):
    tok.add_bos_token = False

import repeng  # noqa: E402
from repeng.extract import read_representations  # noqa: E402
from steering_vectors import train_steering_vector  # noqa: E402

pairs = [tuple(p) for p in job["pairs"]]
layers = list(job["layers"])
repeats = int(job["repeats"])
entries = [repeng.DatasetEntry(positive=p, negative=n) for p, n in pairs]
tokens = sum(len(tok(s)["input_ids"]) for p in pairs for s in p)


def median_time(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


out = {"load_s": load_s, "tokens": tokens, "first_ids": tok(pairs[0][0])["input_ids"],
       "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                    "repeng": "0.4.0", "steering-vectors": "0.12.2"}, "extract": {}}
with torch.inference_mode():
    out["extract"]["repeng_pca_diff_batch32"] = median_time(
        lambda: read_representations(model, tok, entries, hidden_layers=layers, batch_size=32), repeats)
out["extract"]["steering_vectors_mean_batch1"] = median_time(
    lambda: train_steering_vector(model, tok, pairs, layers=layers, batch_size=1), repeats)
out["extract"]["steering_vectors_mean_batch16"] = median_time(
    lambda: train_steering_vector(model, tok, pairs, layers=layers, batch_size=16), repeats)
sv = train_steering_vector(model, tok, pairs, layers=layers, batch_size=16)
probe = job["probe_layer"]
out["sv_mean_diff_probe_layer"] = sv.layer_activations[probe].tolist()

# generation: plain vs steered, interleaved rounds
prompt = tok.apply_chat_template([{"role": "user", "content": job["gen_prompt"]}], tokenize=False,
                                 add_generation_prompt=True)
enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
n_new = int(job["gen_tokens"])
gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
coefficient = float(job["gen_coefficient"])
rounds = {"plain": [], "repeng": [], "steering_vectors": []}
with torch.no_grad():
    cv = repeng.ControlVector(model_type=model.config.model_type,
                              directions={l: (coefficient * sv.layer_activations[l]).numpy() for l in layers})
    for _ in range(int(job["gen_rounds"])):
        rounds["plain"].append(median_time(lambda: model.generate(**enc, **gen), repeats)[0])
        control = repeng.ControlModel(model, layers)
        control.set_control(cv, 1.0)
        rounds["repeng"].append(median_time(lambda: control.generate(**enc, **gen), repeats)[0])
        control.unwrap()
        with sv.apply(model, multiplier=coefficient):
            rounds["steering_vectors"].append(median_time(lambda: model.generate(**enc, **gen), repeats)[0])
out["generate"] = {k: statistics.median(v) for k, v in rounds.items()}
out["generate_rounds"] = rounds
out["gen_prompt_tokens"] = int(enc["input_ids"].shape[1])
out["threads"] = torch.get_num_threads()
out["pid_env_threads"] = os.environ.get("OMP_NUM_THREADS")
print(json.dumps(out))
