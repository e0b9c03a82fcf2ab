"""Scale-out on this machine: SmolLM2-135M-Instruct ReFT training on 1 process against 2 processes (torchrun, gloo),
and K concept adapters trained in one pass against one after another.

Run (always under the machine's CPU lock, bounded by --budget seconds):
    .venv/bin/python benchmarks/scale.py [--steps 6] [--concept-steps 3]

Setup: float32, LoReFT rank 4 at layers 8/16/24 (positions f1+l1, tied) for the process comparison, global batch 8,
lr 4e-3, clipping at 1.0; the 1-process run uses 2 torch threads, each of the 2 processes 1 thread (the machine's
2 cores either way). Examples/s counts training only (`train_seconds`, after the model loaded). The concept part
trains K rank-1 LoReFT adapters at layer 8 (positions l1), each on its own 4 examples with batch 2 (so each step
feeds 2 rows per adapter): "one pass" is `train_concepts` over all K, "one after another" K runs of `train`, both
in this process on 2 threads. Peak memory is the largest resident set size sampled every 10 ms during a run, less
the size before it. Results: benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
MODEL = os.environ.get("SCALE_MODEL", "smollm2-135m-instruct")  # SCALE_MODEL=tiny-llama: a quick check of the script
LAYERS, CONCEPT_LAYER = ([1, 2, 3], 1) if MODEL.startswith("tiny") else ([8, 16, 24], 8)


def machine(threads: dict) -> dict:
    import torch
    import transformers

    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.lower().startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"processor": model, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def sft_rows(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"{tag}What is {a} plus {b}?", "completion": f"The answer is {a + b}."}
            for a in range(1, 20) for b in range(1, 20)][:n]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    def __enter__(self):
        self.base, self.peak, self.stop = rss_mb(), rss_mb(), False

        def sample():
            while not self.stop:
                self.peak = max(self.peak, rss_mb())
                time.sleep(0.01)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def extra_mb(self) -> float:
        return round(self.peak - self.base, 1)


def process_worker(steps: int, out: str) -> None:
    """One rank (or the single process) of the 1-against-2 comparison."""
    import torch

    from reftkit.models import load_model
    from reftkit.reft import distributed
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import TrainArgs, train

    world = distributed.launched_world_size()
    torch.set_num_threads(2 // world)
    model, tok = load_model(MODEL)
    data = encode(tok, sft_rows(8 * steps), "sft")
    reft = ReftModel(model, ReftConfig(method="loreft", layers=LAYERS, rank=4, positions="f1+l1", tied=True))
    args = TrainArgs(max_steps=steps, batch_size=8, lr=4e-3, max_grad_norm=1.0, progress=False, bf16=False)
    res = train(reft, data, args, pad_token_id=tok.pad_token_id)
    if distributed.is_main():
        Path(out).write_text(json.dumps({
            "processes": world, "threads_per_process": torch.get_num_threads(), "steps": res["step"],
            "train_seconds": round(res["train_seconds"], 3), "examples_per_second": round(res["examples_per_second"], 3),
            "losses": res["losses"]}))
    distributed.close()


def processes(steps: int, tmp: Path) -> dict:
    runs = {}
    for n in (1, 2):
        out = tmp / f"procs{n}.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // n), "REFTKIT_DIST_TIMEOUT": "600"}
        worker = [str(Path(__file__).resolve()), "--worker", str(steps), str(out)]
        cmd = [sys.executable, *worker] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *worker]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the {n}-process run failed:\n{proc.stderr[-3000:]}")
        runs[n] = {**json.loads(out.read_text()), "wall_seconds_with_model_load": round(time.perf_counter() - t, 1)}
    one, two = runs[1], runs[2]
    diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    return {"runs": [one, two], "two_over_one_examples_per_second":
            round(two["examples_per_second"] / one["examples_per_second"], 3),
            "max_loss_difference_1_vs_2": diff}


def concepts(ks: list[int], steps: int, budget_end: float) -> dict:
    import torch

    from reftkit.models import load_model
    from reftkit.reft.concepts import concept_model, train_concepts
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import TrainArgs, train

    torch.set_num_threads(2)
    model, tok = load_model(MODEL)
    config = ReftConfig(method="loreft", layers=[CONCEPT_LAYER], rank=1, positions="l1")
    args = TrainArgs(max_steps=steps, batch_size=2, lr=4e-3, max_grad_norm=1.0, progress=False, bf16=False)
    pad = tok.pad_token_id
    warm = ReftModel(model, config)  # one untimed step first: allocator and kernel warm-up
    train(warm, encode(tok, sft_rows(2), "sft"), TrainArgs(max_steps=1, batch_size=2, progress=False, bf16=False),
          pad_token_id=pad)
    warm.unload()
    one_row = []
    for k in ks:
        if time.monotonic() > budget_end:
            one_row.append({"K": k, "skipped": "time budget spent"})
            continue
        data = {f"c{i}": encode(tok, sft_rows(4, tag=f"[{i}] "), "sft") for i in range(k)}
        reft = concept_model(model, config, list(data))
        with PeakRSS() as mem_pass:
            t = time.perf_counter()
            train_concepts(reft, data, args, pad_token_id=pad)
            one_pass = time.perf_counter() - t
        reft.unload()
        seq, mem_seq = 0.0, 0.0
        for name, examples in data.items():
            solo = ReftModel(model, config)
            with PeakRSS() as m:
                t = time.perf_counter()
                train(solo, examples, args, pad_token_id=pad)
                seq += time.perf_counter() - t
            mem_seq = max(mem_seq, m.extra_mb)
            solo.unload()
        one_row.append({"K": k, "one_pass_seconds": round(one_pass, 3), "one_after_another_seconds": round(seq, 3),
                        "speedup_one_pass_vs_sequential": round(seq / one_pass, 3),
                        "one_pass_peak_extra_rss_mb": mem_pass.extra_mb, "sequential_peak_extra_rss_mb": mem_seq})
    single = next((r for r in one_row if r["K"] == 1 and "one_pass_seconds" in r), None)
    for r in one_row:
        if single and "one_pass_seconds" in r:
            r["one_pass_over_one_adapter_time"] = round(r["one_pass_seconds"] / single["one_pass_seconds"], 3)
    return {"rows": one_row, "target": "16 adapters in one pass in <= 1.25x the time of one adapter"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps of the 1-vs-2-process runs")
    parser.add_argument("--concept-steps", type=int, default=3, help="optimizer steps of each concept run")
    parser.add_argument("--ks", default="1,4,16,64", help="adapter counts K")
    parser.add_argument("--budget", type=float, default=900, help="stop starting new measurements after this many s")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        process_worker(int(a.worker[0]), a.worker[1])
        return
    import tempfile

    end = time.monotonic() + a.budget
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        procs = processes(a.steps, Path(tmp))
    conc = concepts([int(k) for k in a.ks.split(",")], a.concept_steps, end)
    result = {"when": started, "command": " ".join(["benchmarks/scale.py", *sys.argv[1:]]),
              "machine": machine({"one_process": 2, "two_processes": "1 each", "concepts": 2}),
              "processes": procs, "concepts": conc}
    result["model"] = MODEL
    if MODEL == "smollm2-135m-instruct":
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
