"""Speed of causal tracing and exact activation patching on SmolLM2-135M-Instruct (CPU).

1. Causal tracing of "The Eiffel Tower is located in the city of" (10 tokens): all 30 layers x every position
   from the subject on x 3 components (hidden state, MLP and attention with 10-layer windows), 5 noise samples
   = 4,050 restored runs. Measured with 2 torch threads, with OpenMP's default (spinning) wait policy and with
   OMP_WAIT_POLICY=PASSIVE, and with 1 thread. The target is <= 60 s with 2 threads.
2. Exact activation patching (denoising, logit difference Paris - Rome, Eiffel Tower vs Colosseum prompts),
   block output at every layer x position = 300 sites: sites per second of the engine evaluator as the number of
   sites per forward grows (1, 8, 32, 128), of the replay evaluator, and of a plain-hooks loop (one forward per
   site) for reference.
Each configuration runs in its own process (the wait policy is read when OpenMP starts). The machine's load
average is recorded next to each figure: the CPU is shared, and timings on a loaded machine are slower.

Run:  .venv/bin/python benchmarks/tracing.py            -> benchmarks/results/tracing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tracing.json"
PROMPT, SUBJECT, TARGET = "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"
CORRUPTED = "The Colosseum is located in the city of"


def _load():
    from transformers.utils import logging as hf_logging

    from reftkit.models import load_model

    hf_logging.set_verbosity_error()
    return load_model("smollm2-135m-instruct")


def worker_trace(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from reftkit.analysis.tracing import causal_trace

    model, tokenizer = _load()
    causal_trace(model, tokenizer, PROMPT, SUBJECT, TARGET, samples=1, components=("block_output",))  # warm-up
    load = os.getloadavg()[0]
    started = time.perf_counter()
    r = causal_trace(model, tokenizer, PROMPT, SUBJECT, TARGET, samples=5, window=10)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "restorations": r.extra["restorations"],
            "restorations_per_second": round(r.extra["restorations"] / seconds, 1), "tokens": len(r.tokens),
            "clean_prob": round(r.clean_prob, 4), "corrupted_prob": round(r.corrupted_prob, 4),
            "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)}


def worker_patching(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from reftkit.analysis.patching import LogitDifference, activation_patching
    from reftkit.sites import Site, resolve_site

    model, tokenizer = _load()
    metric = LogitDifference(" Paris", " Rome", tokenizer=tokenizer)
    out = {"sites": 300, "runs": []}

    def timed(label, chunk, method, positions=None):
        load = os.getloadavg()[0]
        started = time.perf_counter()
        r = activation_patching(model, PROMPT, CORRUPTED, metric, tokenizer=tokenizer, positions=positions,
                                method=method, chunk_size=chunk)
        seconds = time.perf_counter() - started
        sites = r.effects[0, 0].numel()
        out["runs"].append({"evaluator": label, "sites_per_forward": chunk, "sites": sites,
                            "seconds": round(seconds, 2), "sites_per_second": round(sites / seconds, 2),
                            "load_average_before": round(load, 2)})

    activation_patching(model, PROMPT, CORRUPTED, metric, tokenizer=tokenizer, layers=[0], positions=[9])  # warm-up
    timed("engine", 1, "engine", positions=[9])  # 30 sites, one forward each
    for chunk in (8, 32, 128):
        timed("engine", chunk, "engine")
    timed("replay", 128, "replay")

    # plain hooks: the clean activations captured in one forward, then one patched forward per site
    ids = tokenizer([PROMPT, CORRUPTED], return_tensors="pt")["input_ids"]
    clean, corrupted = ids[:1], ids[1:]
    started = time.perf_counter()
    modules = [resolve_site(model, Site(layer=layer)).module for layer in range(model.config.num_hidden_layers)]
    store = {}
    with torch.no_grad():
        handles = [m.register_forward_hook(lambda mod, a, o, k=k: store.__setitem__(k, o.clone()))
                   for k, m in enumerate(modules)]
        model(input_ids=clean)
        for h in handles:
            h.remove()
        for k, module in enumerate(modules):
            def patch(mod, a, o, k=k):
                o = o.clone()
                o[:, 9] = store[k][:, 9]
                return o

            h = module.register_forward_hook(patch)
            model(input_ids=corrupted)
            h.remove()
    seconds = time.perf_counter() - started
    out["runs"].append({"evaluator": "plain hooks (one clean forward, then one forward per site)",
                        "sites_per_forward": 1, "sites": 30, "seconds": round(seconds, 2),
                        "sites_per_second": round(30 / seconds, 2)})
    return out


def _spawn(kind: str, threads: int, wait_policy: str | None) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"torch_threads": threads, "omp_wait_policy": wait_policy or "default", **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("trace", "patching"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        fn = worker_trace if args.worker == "trace" else worker_patching
        print(json.dumps(fn(args.threads)))
        return
    trace = []
    for threads, policy in ((2, None), (2, "PASSIVE"), (1, None)):
        trace.append(_spawn("trace", threads, policy))
        print(json.dumps(trace[-1]), file=sys.stderr)
    patching = _spawn("patching", 2, "PASSIVE")
    print(json.dumps(patching), file=sys.stderr)
    result = {"model": "smollm2-135m-instruct", "prompt": PROMPT, "subject": SUBJECT, "target": TARGET,
              "cpu": _cpu(), "cores": os.cpu_count(), "platform": platform.platform(),
              "causal_tracing": trace, "activation_patching": patching}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
