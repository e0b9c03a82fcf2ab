"""fp32 against bf16 autocast training on this processor, and what `bf16="auto"` picks here.

The setup is `reft_speed.py`'s (SmolLM2-135M-Instruct, LoReFT rank 4 at layers 8/16/24, f1+l1 tied, batch 8,
gradients clipped at 1.0). Each precision runs in its own process: one warm-up step, then `--steps` timed steps;
the median step time is reported. Run alone on a quiet machine:

    .venv/bin/python benchmarks/precision.py [--steps 3] [--bf16-steps 2] [--threads 2]

and, on a processor with native bf16, once more under an AVX2-only ATen path to see the emulated case:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/precision.py --tag avx2-path

Results go to benchmarks/results/precision[-TAG].json with the processor, its bf16 features, the ATen capability,
thread count and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reft_speed import LAYERS, _data  # noqa: E402  (the same data and layers as the speed benchmark)


def worker(precision: str, steps: int, threads: int) -> dict:
    import torch

    from reftkit.models import load_model
    from reftkit.precision import resolve_bf16
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import TrainArgs, train

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, tok = load_model("smollm2-135m-instruct")
    data = encode(tok, _data(), "sft")
    reft = ReftModel(model, ReftConfig(method="loreft", layers=LAYERS, rank=4, positions="f1+l1", tied=True))
    setting = {"fp32": False, "bf16": True, "auto": "auto"}[precision]
    times: list[float] = []
    real_step = torch.optim.AdamW.step

    def timed_step(self, *a, **k):  # an optimizer step closes a training step: time between consecutive ones
        out = real_step(self, *a, **k)
        times.append(time.perf_counter())
        return out

    torch.optim.AdamW.step = timed_step
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = train(reft, data, TrainArgs(max_steps=steps + 1, batch_size=8, lr=4e-3, max_grad_norm=1.0,
                                              progress=False, bf16=setting), pad_token_id=tok.pad_token_id)
    finally:
        torch.optim.AdamW.step = real_step
    step_times = [b - a for a, b in zip(times, times[1:])]  # the first step (warm-up) is left out
    return {"precision": precision, "ran_bf16": res["args"]["bf16"], "steps_timed": len(step_times),
            "s_per_step": statistics.median(step_times), "step_times": step_times,
            "first_step_s": times[0] - start, "losses": res["losses"],
            "warnings": [str(w.message) for w in caught if "bf16" in str(w.message)],
            "auto_would_pick_bf16": resolve_bf16("auto", "cpu", warn=False)}


def machine() -> dict:
    import torch
    import transformers

    from reftkit.precision import _cpu_flags, bf16_support

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = _cpu_flags()
    native, reason = bf16_support("cpu")
    return {"processor": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "bf16_features": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
            "avx512": any(f.startswith("avx512") for f in flags),
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR") if k in os.environ},
            "native_bf16": native, "reason": reason,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed fp32 and auto steps (after one warm-up step)")
    ap.add_argument("--bf16-steps", type=int, default=2, help="timed bf16 steps (slow where bf16 is emulated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the results file, e.g. avx2-path")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.threads)))
        return
    runs = {}
    for precision, steps in (("fp32", args.steps), ("bf16", args.bf16_steps), ("auto", args.steps)):
        out = subprocess.run([sys.executable, __file__, "--worker", precision, "--steps", str(steps),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        runs[precision] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{precision}: {runs[precision]['s_per_step']:.2f} s/step (bf16 ran: {runs[precision]['ran_bf16']})",
              file=sys.stderr)
    result = {"machine": machine(), "threads": args.threads, "setup": "SmolLM2-135M LoReFT r4 layers 8/16/24 f1+l1 "
              "tied, batch 8, clip 1.0", "runs": runs,
              "bf16_over_fp32": runs["bf16"]["s_per_step"] / runs["fp32"]["s_per_step"],
              "auto_over_fp32": runs["auto"]["s_per_step"] / runs["fp32"]["s_per_step"],
              "date": time.strftime("%Y-%m-%d %H:%M")}
    path = ROOT / "benchmarks" / "results" / f"precision{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("bf16_over_fp32", "auto_over_fp32")} | {"file": str(path)}, indent=2))


if __name__ == "__main__":
    main()
