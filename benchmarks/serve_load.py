"""Load benchmark of `reftkit serve`, side by side with in-process batched `generate` on the same prompts.

Run (heavy: under the shared lock):
    .venv/bin/python benchmarks/serve_load.py [--threads 2] [--quick]

What it does, in one run, loopback only, bounded in time and count:
1. Loads SmolLM2-135M-Instruct (float32) here, makes 8 random LoReFT adapters (rank 4, layers 8/16/24, position
   l1) and saves them to a temporary folder.
2. Reference, in process (`--threads` torch threads): greedy `generate` of the 8 prompts (~30 tokens each, 32 new
   tokens) as one left-padded batch, of one prompt alone, and of the 8 prompts with 8 different adapters
   (`ReftModel.generate(adapter_names=...)`).
3. Starts `reftkit serve` as a subprocess with the same adapters and thread count, then drives it with streamed
   `/v1/completions` requests (httpx, SSE parsed here, `stream_options.include_usage`):
   - closed loop at concurrency 1, 4, 8, 16 (each worker sends its next request when the last one ended);
   - at concurrency 8: all requests for the base model against one adapter per worker (8 distinct adapters),
     alternated, median of the rounds;
   - open loop, Poisson arrivals at 70% of the measured concurrency-8 capacity;
   - open loop at 2x capacity with a queue limit: statuses, latency of the 503s, the server's RSS before and
     after, and how long the queue takes to drain when the load stops.
   Each phase reports req/s, output tokens/s, TTFT, inter-token latency and end-to-end latency (p50/p90/p99)
   and errors.
Results: benchmarks/results/serve_load.json (processor, threads, versions, every figure, the targets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 32
LAYERS = [8, 16, 24]
TOPICS = ["the ocean", "a lighthouse keeper", "mountain trains", "a small bakery", "the first snow", "old maps",
          "a lost robot", "the night market"]


def prompts() -> list[str]:
    return [f"Write a long and detailed story about {t}. Describe the place, the people who live there, what they "
            f"do every day, and what happens next:" for t in TOPICS]


def processor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def dist(values):
    return {"p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99), "n": len(values)}


# ---- reference ------------------------------------------------------------------------------------------------
def reference(model, tok, reft, names, repeats: int) -> dict:
    import torch

    from reftkit.serve.generation import eos_ids

    ids = [tok(p)["input_ids"] for p in prompts()]
    pad = tok.pad_token_id

    def batch(rows):
        T = max(len(r) for r in rows)
        x = torch.full((len(rows), T), pad, dtype=torch.long)
        m = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, T - len(r):] = torch.tensor(r)
            m[i, T - len(r):] = 1
        return x, m

    eos = eos_ids(model, tok)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad, eos_token_id=sorted(eos))

    def count(out, T):
        n = 0
        for row in out[:, T:].tolist():
            for t in row:
                n += 1
                if t in eos:
                    break
        return n

    def timed(fn):
        fn()  # warm-up
        ts, toks = [], 0
        for _ in range(repeats):
            t = time.perf_counter()
            toks = fn()
            ts.append(time.perf_counter() - t)
        s = statistics.median(ts)
        return {"seconds": s, "tokens": toks, "tokens_per_s": toks / s}

    x8, m8 = batch(ids)
    x1, m1 = batch(ids[:1])
    with torch.no_grad():
        out = {
            "batch8_base": timed(lambda: count(model.generate(x8, attention_mask=m8, **gen), x8.shape[1])),
            "batch1_base": timed(lambda: count(model.generate(x1, attention_mask=m1, **gen), x1.shape[1])),
            "batch8_8_adapters": timed(lambda: count(reft.generate(x8, m8, adapter_names=names, **gen),
                                                     x8.shape[1])),
        }
    out["prompt_tokens"] = [len(r) for r in ids]
    return out


# ---- load generation --------------------------------------------------------------------------------------------
async def one_request(h, url, prompt, model) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens, status = [], 0, None
    try:
        async with h.stream("POST", url + "/v1/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {"status": status, "e2e": time.perf_counter() - start}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 500, "e2e": time.perf_counter() - start}
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # a refused or dropped connection counts as an error
        return {"status": f"{type(e).__name__}", "e2e": time.perf_counter() - start}
    end = time.perf_counter()
    return {"status": 200, "e2e": end - start, "ttft": (stamps[0] - start) if stamps else None,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens}


def summarise(results, seconds) -> dict:
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    statuses = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok), "statuses": statuses,
            "seconds": seconds, "req_per_s": len(ok) / seconds, "output_tokens_per_s": tokens / seconds,
            "ttft_s": dist([r["ttft"] for r in ok if r.get("ttft") is not None]),
            "itl_s": dist([x for r in ok for x in r["itl"]]), "e2e_s": dist([r["e2e"] for r in ok])}


async def closed_loop(url, concurrency, requests_per_worker, models) -> dict:
    import httpx

    ps = prompts()
    results = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as h:
        async def worker(w):
            for k in range(requests_per_worker):
                results.append(await one_request(h, url, ps[(w + k) % len(ps)], models[w % len(models)]))

        start = time.perf_counter()
        await asyncio.gather(*[worker(w) for w in range(concurrency)])
        seconds = time.perf_counter() - start
    out = summarise(results, seconds)
    out["concurrency"] = concurrency
    return out


async def open_loop(url, rate, duration, models, seed=0) -> dict:
    import httpx

    rng = random.Random(seed)
    ps = prompts()
    tasks = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=256)) as h:
        start = time.perf_counter()
        t, k = 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t > duration:
                break
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(h, url, ps[k % len(ps)], models[k % len(models)])))
            k += 1
        sent_for = time.perf_counter() - start
        results = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    out = summarise(results, seconds)
    out.update({"rate_req_per_s": rate, "arrival_seconds": sent_for})
    shed = [r["e2e"] for r in results if r["status"] == 503]
    out["shed_503_latency_s"] = dist(shed)
    return out


# ---- the server process -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(url, name) -> float:
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:  # counted as not drained yet
        return float("nan")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def start_server(model: str, adapters: dict, port: int, threads: int, max_queue: int, max_wait_ms: float):
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, "-m", "reftkit", "serve", "--model", model, "--port", str(port), "--max-batch-size", "8",
            "--max-wait-ms", str(max_wait_ms), "--max-queue", str(max_queue), "--max-new-tokens", str(NEW_TOKENS),
            "--device", "cpu"]
    for name, folder in adapters.items():
        args += ["--adapter", f"{name}={folder}"]
    # the server logs one line per request: to a file, never to a pipe nobody reads (a full pipe blocks it)
    log = open(Path(tempfile.gettempdir()) / f"serve-load-{port}.log", "wb")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the server did not start in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each in-process reference timing")
    ap.add_argument("--quick", action="store_true", help="fewer requests per phase (a smoke run)")
    ap.add_argument("--model", default=MODEL, help="the model (default %(default)s; tiny-llama for a smoke run)")
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--poisson-seconds", type=float, default=30.0)
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    args = ap.parse_args()
    began = time.perf_counter()

    import torch
    import transformers

    from reftkit.models import load_model
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.model import ReftModel

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    layers = LAYERS if args.model == MODEL else [1, 2, 3]
    reft = ReftModel(model)
    names = [f"a{k}" for k in range(8)]
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    adapters = {}
    for k, name in enumerate(names):
        reft.add_adapter(name, ReftConfig(method="loreft", layers=layers, rank=4, positions="l1", seed=k))
        reft.save_pretrained(tmp / name, adapter_name=name)
        adapters[name] = tmp / name
    print("reference (in process) ...", file=sys.stderr)
    ref = reference(model, tok, reft, names, args.repeats)
    reft.unload()
    del model, reft

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print("starting the server ...", file=sys.stderr)
    proc = start_server(args.model, adapters, port, args.threads, args.max_queue, args.max_wait_ms)
    phases = {}
    try:
        asyncio.run(closed_loop(url, 2, 1, [args.model]))  # warm-up
        per_worker = {1: 4, 4: 3, 8: 3, 16: 3} if not args.quick else {1: 2, 4: 1, 8: 1, 16: 1}
        for c in (1, 4, 8, 16):
            print(f"closed loop, concurrency {c} ...", file=sys.stderr)
            phases[f"closed_{c}"] = asyncio.run(closed_loop(url, c, per_worker[c], [args.model]))
        rounds = {"base": [], "adapters": []}
        for _ in range(2 if not args.quick else 1):
            rounds["base"].append(asyncio.run(closed_loop(url, 8, per_worker[8], [args.model])))
            rounds["adapters"].append(asyncio.run(closed_loop(url, 8, per_worker[8], names)))
        phases["concurrency8_base_rounds"] = rounds["base"]
        phases["concurrency8_8_adapters_rounds"] = rounds["adapters"]
        capacity = max(phases["closed_8"]["req_per_s"], statistics.median(r["req_per_s"] for r in rounds["base"]))
        print(f"open loop at 70% of {capacity:.2f} req/s ...", file=sys.stderr)
        phases["poisson_70pct"] = asyncio.run(open_loop(url, 0.7 * capacity, args.poisson_seconds, [args.model]))
        rss_before = rss_mb(proc.pid)
        print("open loop at 2x capacity ...", file=sys.stderr)
        over = asyncio.run(open_loop(url, 2 * capacity, args.overload_seconds, [args.model], seed=1))
        stopped = time.perf_counter()
        while (metric(url, "reftkit_queue_depth") != 0 or metric(url, "reftkit_running_rows") != 0) and \
                time.perf_counter() - stopped < 60:
            time.sleep(0.05)
        over["queue_drained_after_s"] = time.perf_counter() - stopped  # after the last response arrived
        over["rss_mb_before"], over["rss_mb_after"] = rss_before, rss_mb(proc.pid)
        phases["overload_2x"] = over
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    base8 = statistics.median(r["output_tokens_per_s"] for r in rounds["base"])
    adapters8 = statistics.median(r["output_tokens_per_s"] for r in rounds["adapters"])
    over = phases["overload_2x"]
    statuses = set(over["statuses"])
    summary = {
        "server_c8_tokens_per_s": phases["closed_8"]["output_tokens_per_s"],
        "inprocess_batch8_tokens_per_s": ref["batch8_base"]["tokens_per_s"],
        "server_c8_vs_inprocess_batch8": phases["closed_8"]["output_tokens_per_s"] / ref["batch8_base"]["tokens_per_s"],
        "target_server_c8_vs_inprocess_batch8": ">= 0.85",
        "c8_8_adapters_vs_base_tokens_per_s": adapters8 / base8,
        "target_8_adapters_vs_base": ">= 0.95",
        "inprocess_8_adapters_vs_base": ref["batch8_8_adapters"]["tokens_per_s"] / ref["batch8_base"]["tokens_per_s"],
        "server_c1_tokens_per_s": phases["closed_1"]["output_tokens_per_s"],
        "inprocess_batch1_tokens_per_s": ref["batch1_base"]["tokens_per_s"],
        "server_c1_overhead": ref["batch1_base"]["tokens_per_s"] / phases["closed_1"]["output_tokens_per_s"] - 1,
        "target_server_c1_overhead": "<= 0.10",
        "errors_below_capacity": sum(p["errors"] for k, p in phases.items() if k.startswith(("closed", "poisson"))
                                     and isinstance(p, dict))
        + sum(r["errors"] for r in rounds["base"] + rounds["adapters"]),
        "overload_only_200_and_503": statuses <= {"200", "503"},
        "overload_503_p99_s": over["shed_503_latency_s"]["p99"],
        "target_overload_503_p99_s": "<= 0.05",
        "overload_rss_growth": over["rss_mb_after"] / over["rss_mb_before"] - 1,
        "overload_queue_drained_after_s": over["queue_drained_after_s"],
    }
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"processor": processor(), "cpu_count": os.cpu_count(), "threads": args.threads,
                          "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "setup": {"model": args.model, "dtype": "float32", "new_tokens": NEW_TOKENS, "greedy": True,
                        "prompt_tokens": ref["prompt_tokens"], "max_batch_size": 8, "max_wait_ms": args.max_wait_ms,
                        "max_queue": args.max_queue, "adapters": "8 random LoReFT, rank 4, layers 8/16/24, l1",
                        "client": "httpx streamed /v1/completions, one process, loopback", "quick": args.quick},
              "summary": summary, "reference_inprocess": ref, "phases": phases,
              "wall_seconds": time.perf_counter() - began}
    target = RESULTS if args.model == MODEL and not args.quick else Path(tempfile.gettempdir()) / "serve_load_smoke.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    out = target.with_suffix(".json.tmp")
    out.write_text(json.dumps(report, indent=2))
    out.replace(target)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
