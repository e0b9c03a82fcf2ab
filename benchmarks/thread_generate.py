"""Greedy generation in the main thread against a second Python thread of the same process.

`reftkit serve` runs `generate` in an engine thread. This measures what that costs by itself: SmolLM2-135M-Instruct,
one prompt, 32 greedy tokens (`min_new_tokens=32`), the same torch thread count in both places, median of
`--repeats` after one warm-up each. Also a large matrix product in both places, which goes to MKL's own threads.
Run alone on a quiet machine:

    .venv/bin/python benchmarks/thread_generate.py [--threads 2] [--repeats 5]

Results go to benchmarks/results/thread_generate.json with the processor, thread count and library versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision import machine  # noqa: E402  (processor, features, versions)

PROMPT = "Tell me a short story about a dog and a ball in the park, please, with details."


def in_thread(function):
    out = []
    worker = threading.Thread(target=lambda: out.append(function()), name="bench-worker")
    worker.start()
    worker.join()
    return out[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    import torch

    from reftkit.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct")
    inputs = tok([PROMPT], return_tensors="pt")
    x = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))

    def generate_times() -> list[float]:
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            times.append(time.perf_counter() - start)
        return times[1:]

    def matmul_times() -> list[float]:
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            for _ in range(10):
                x @ x
            times.append(time.perf_counter() - start)
        return times[1:]

    rows = {}
    for name, function in (("generate", generate_times), ("matmul_2048_x10", matmul_times)):
        main_times = function()
        thread_times = in_thread(function)
        rows[name] = {"main_thread_s": main_times, "second_thread_s": thread_times,
                      "median_main_s": statistics.median(main_times),
                      "median_second_s": statistics.median(thread_times),
                      "second_over_main": statistics.median(thread_times) / statistics.median(main_times)}
        print(f"{name}: main {rows[name]['median_main_s']:.3f} s, second thread {rows[name]['median_second_s']:.3f} s "
              f"({rows[name]['second_over_main']:.2f}x)")
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": {**machine(), "threads": args.threads,
              "python": platform.python_version()},
              "setup": {"model": "smollm2-135m-instruct", "prompt_tokens": int(inputs["input_ids"].shape[1]),
                        "new_tokens": args.tokens, "repeats": args.repeats, "dtype": "float32"},
              "results": rows}
    out = ROOT / "benchmarks" / "results" / "thread_generate.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
