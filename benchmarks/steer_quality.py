"""Steering quality on SmolLM2-135M-Instruct: steering vectors, LoReFT and prompting on one protocol, on a CPU.

Three behaviours, each with a rule that checks a reply (reftkit.behaviours specs):

- `all_caps` (a style): every letter of the reply upper case;
- `ocean` (a topic): the reply mentions the ocean, the sea or waves;
- `bullets` (a format): the reply is a list whose first line starts with "- ".

Training data is built from the base model's own answers: the base model's greedy reply to each training prompt,
and the same reply carrying the behaviour (upper-cased; prefixed with a sentence about the ocean; split into
"- " lines). So every method learns the behaviour from contrasts whose content is the base model's own, and
content retention measures what steering costs the content, not what the data taught.

Methods, side by side, on the held-out prompts and facts (`reftkit.steer.evaluate.sweep`): the base model; a
prompting baseline (the instruction as a system message); `mean_diff` (CAA) and `pca` `diff_centered` vectors
read as the mean over the completion tokens at one layer and applied from the last prompt token on, coefficients
in units of the layer's typical hidden-state norm; `actadd` (one instruction pair, front of the prompt, raw
coefficients); LoReFT rank 1 and rank 4 trained on the same pairs' behaviour side (reftkit.reft). Every method's
coefficient (where it has one) is chosen on the validation half of the prompts and facts by the AxBench-style
harmonic mean of behaviour rate, content retention and fluency (base perplexity over steered perplexity on
neutral text), and reported on the test half. Also reported: KL(base || steered) per token and NLL on neutral
text, distinct-2, Δ log-likelihood steerability over the grid (mean slope, anti-steerable fraction, Spearman ρ)
on held-out pairs, and train/extract time. A small layers × strengths sweep of the all-caps `mean_diff` vector
under a KL budget shows how the layer decides the outcome.

    .venv/bin/python benchmarks/steer_quality.py          # ~15-20 min, 2 threads
    .venv/bin/python benchmarks/steer_quality.py --quick  # smoke run

Results: benchmarks/results/steer_quality.json and steer_quality.png (`--quick`: steer_quality_quick.*).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL_NAME = "smollm2-135m-instruct"

SETTINGS = {
    "seed": 0,
    "threads": 2,
    "layer": 6,
    "train_reply_tokens": 40,
    "max_new_tokens": 32,
    "batch_size": 8,
    "grid_hidden_norm": [0.125, 0.25, 0.5, 1.0],  # coefficient 0 is the base row
    "grid_actadd": [1.0, 2.0, 4.0, 8.0],
    "scope": "last_prompt_token_then_generated",
    "reft": {"layers": [8, 16, 24], "positions": "f1+l1", "tied": True},
    "reft_train": {"epochs": 8, "batch_size": 8, "lr": 4e-3},
    "reft_ranks": [1, 4],
    "layer_sweep": {"behaviour": "all_caps", "layers": [3, 6, 9], "grid": [0.25, 0.5], "kl_budget": 2.0},
}
QUICK = {**SETTINGS, "grid_hidden_norm": [0.25, 0.5], "grid_actadd": [2.0, 4.0], "reft_ranks": [1],
         "reft_train": {"epochs": 1, "batch_size": 8, "lr": 4e-3}, "max_new_tokens": 12, "train_reply_tokens": 16,
         "layer_sweep": {"behaviour": "all_caps", "layers": [3, 6], "grid": [0.5], "kl_budget": 2.0}}

TRAIN_PROMPTS = [
    "What is the capital of Portugal?", "How many wheels does a bicycle have?", "What do cows drink?",
    "Describe a sunny afternoon in the park.", "What is your favourite fruit and why?",
    "How do you make a cup of tea?", "What is the largest ocean on Earth?", "Why do birds fly south in winter?",
    "Tell me about elephants.", "What is the capital of Canada?", "How many hours are in a day?",
    "What is a good way to learn a new language?", "Describe the taste of chocolate.",
    "What is the tallest mountain in the world?", "Why is exercise good for you?",
    "What do plants need to grow?", "Tell me about the moon.", "How does a rainbow form?",
    "What is the capital of Australia?", "Give me a tip for sleeping better.", "What is a computer?",
    "How many continents are there?", "Describe a busy city street.", "What is the color of grass?",
]
# more training prompts in the style of the facts (none of them is a held-out fact), for the recipe search
EXTRA_FACT_PROMPTS = [
    "What is the capital of China?", "What is the capital of India?", "What is the capital of Brazil?",
    "What is the capital of Mexico?", "What is the capital of Greece?", "What is the capital of Kenya?",
    "What is the capital of Peru?", "What is the capital of Norway?", "What is the capital of Sweden?",
    "What is the capital of Ireland?", "How many legs does a dog have?", "How many legs does an insect have?",
    "What color is a banana?", "What color is snow?", "What is the smallest planet in our solar system?",
    "What do cows give us?", "Who painted the Mona Lisa?", "How many months are in a year?",
    "What is the opposite of up?", "What is melted ice called?", "What animal says meow?",
    "What is the closest star to Earth?", "How many sides does a triangle have?", "What do caterpillars become?",
]
RECIPES = {  # candidates for all-caps replies that keep the facts (LoReFT on the base model's own answers)
    "r4_l8-16-24_f1l1_24p_e8": {"rank": 4, "layers": [8, 16, 24], "positions": "f1+l1", "extra": False,
                                "epochs": 8, "lr": 4e-3},
    "r4_l8-16-24_f1l1_48p_e4": {"rank": 4, "layers": [8, 16, 24], "positions": "f1+l1", "extra": True,
                                "epochs": 4, "lr": 4e-3},
    "r1_l8-16-24_f1l1_48p_e4": {"rank": 1, "layers": [8, 16, 24], "positions": "f1+l1", "extra": True,
                                "epochs": 4, "lr": 4e-3},
    "r4_l8-16-24_f1l1_48p_e3_lr2e-3": {"rank": 4, "layers": [8, 16, 24], "positions": "f1+l1", "extra": True,
                                       "epochs": 3, "lr": 2e-3},
    "r4_l16-24_f3l3_48p_e4": {"rank": 4, "layers": [16, 24], "positions": "f3+l3", "extra": True,
                              "epochs": 4, "lr": 4e-3},
}

HELDOUT_PROMPTS = [
    "Tell me about your favourite season.", "How do I cook rice?", "What makes a good friend?",
    "Describe a rainy day.", "Why do people like music?", "What is a library for?",
    "Give me advice for a job interview.", "Tell me about cats.", "What should I pack for a trip?",
    "How do trees help the planet?", "Describe your ideal breakfast.", "What is the internet?",
    "Why is reading important?", "How do you stay calm under stress?", "Tell me about the sun.",
    "What is a good hobby to start?",
]
FACTS = [
    {"prompt": "What is the capital of France?", "answer": "Paris"},
    {"prompt": "What is the capital of Japan?", "answer": "Tokyo"},
    {"prompt": "What is the capital of Italy?", "answer": "Rome"},
    {"prompt": "What is the capital of Germany?", "answer": "Berlin"},
    {"prompt": "What is the capital of Spain?", "answer": "Madrid"},
    {"prompt": "What is the capital of Egypt?", "answer": "Cairo"},
    {"prompt": "What is the capital of England?", "answer": "London"},
    {"prompt": "What is the capital of Russia?", "answer": "Moscow"},
    {"prompt": "How many legs does a spider have?", "answer": ["eight", "8"]},
    {"prompt": "What color is the sky on a clear day?", "answer": "blue"},
    {"prompt": "What is the largest planet in our solar system?", "answer": "Jupiter"},
    {"prompt": "What do bees make?", "answer": "honey"},
    {"prompt": "Who wrote Romeo and Juliet?", "answer": "Shakespeare"},
    {"prompt": "How many days are in a week?", "answer": ["seven", "7"]},
    {"prompt": "What is the opposite of hot?", "answer": "cold"},
    {"prompt": "What is frozen water called?", "answer": "ice"},
]
NEUTRAL = [
    "The train left the station a few minutes after noon, and most of the passengers were reading.",
    "Water boils at one hundred degrees Celsius at sea level, a fact taught in most schools.",
    "She opened the window to let in the cool morning air before starting her work.",
    "The committee will meet again next week to discuss the budget for the coming year.",
    "Many gardens in the village are full of roses and tomatoes by the middle of summer.",
    "He wrote a short letter to his grandmother and posted it on the way to the shop.",
]


def _bullets(reply: str) -> str:
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", reply) if p.strip()]
    return "\n".join(f"- {p}" for p in parts) if parts else f"- {reply}"


BEHAVIOURS = {
    "all_caps": {"check": "all_caps", "transform": str.upper,
                 "instruction": "Always answer in capital letters only, like this: THE ANSWER IS HERE.",
                 "actadd": ("ANSWER IN CAPITAL LETTERS", "answer in lowercase letters")},
    "ocean": {"check": r"regex:(?i)\b(ocean|oceans|sea|seas|wave|waves)\b",
              "transform": lambda r: "Thinking of the ocean and its waves: " + r,
              "instruction": "Always mention the ocean in your answer.",
              "actadd": ("Talk about the ocean", "Talk about anything")},
    "bullets": {"check": r"regex:^-\s", "transform": _bullets,
                "instruction": "Always answer as a bulleted list: every line starts with '- '.",
                "actadd": ("Answer as a bulleted list", "Answer as a paragraph")},
}


def machine_info(threads: int) -> dict:
    import transformers

    import reftkit

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "processor": cpu,
            "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "reftkit": getattr(reftkit, "__version__", "unknown"),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def greedy(model, tok, prompts, n_tokens, batch_size):
    from reftkit.steer.evaluate import BaseMethod, replies

    return replies(model, tok, BaseMethod(), prompts, max_new_tokens=n_tokens, batch_size=batch_size)


def trim(reply: str) -> str:
    """A reply cut at its last full sentence (when it has one), so training completions end cleanly."""
    cut = max(reply.rfind(". "), reply.rfind(".\n"), reply.rfind("! "), reply.rfind("? "))
    if reply.endswith((".", "!", "?")):
        return reply
    return reply[:cut + 1] if cut > 0 else reply


def summary(report: dict, seconds: float) -> dict:
    test = report["test"]["metrics"]
    out = {"best_coefficient": report["best_coefficient"], "test_score": round(report["test"]["score"], 4),
           "validation_score": round(report["best_validation_score"], 4),
           "behaviour_rate": test["behaviour_rate"], "content_retention": test.get("content_retention"),
           "facts_base_correct": test.get("facts_base_correct"), "fluency": round(test["fluency"], 4),
           "kl": round(test["kl"], 4), "nll": round(test["nll"], 4), "base_nll": round(test["base_nll"], 4),
           "distinct_2": round(test["distinct_2"], 4), "fit_seconds": round(seconds, 2),
           "collapse": report["collapse"], "samples": test["replies"][:3],
           "validation": [{"coefficient": p["coefficient"], "score": round(p["score"], 4),
                           **{k: (round(p["metrics"][k], 4) if isinstance(p["metrics"].get(k), float)
                                  else p["metrics"].get(k))
                              for k in ("behaviour_rate", "content_retention", "fluency", "kl", "distinct_2")}}
                          for p in report["validation"]]}
    st = report.get("steerability")
    if st:
        out["steerability"] = {"mean_slope": round(st["mean_slope"], 4),
                               "anti_steerable_fraction": st["anti_steerable_fraction"],
                               "spearman": st["spearman"]}
    if report.get("likelihood") and not st:
        out["delta_loglik"] = round(report["likelihood"]["mean"][0], 4)
    return out


def run_behaviour(model, tok, name: str, spec: dict, cfg: dict, base_train: list, base_heldout: list,
                  shared: dict) -> dict:
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import TrainArgs, train
    from reftkit.steer.evaluate import AdapterMethod, BaseMethod, PromptMethod, VectorMethod, sweep
    from reftkit.steer.extract import actadd, extract

    t = spec["transform"]
    pairs = [{"prompt": p, "positive": t(r), "negative": r} for p, r in zip(TRAIN_PROMPTS, base_train) if r]
    heldout_pairs = [{"prompt": p, "target": t(r), "other": r} for p, r in zip(HELDOUT_PROMPTS, base_heldout) if r]
    data = {"prompts": HELDOUT_PROMPTS, "facts": FACTS, "neutral": NEUTRAL, "pairs": heldout_pairs}
    common = dict(behaviour_spec=spec["check"], seed=cfg["seed"], max_new_tokens=cfg["max_new_tokens"],
                  batch_size=cfg["batch_size"], _shared=shared)
    results = {}

    def record(key, report, seconds):
        results[key] = summary(report, seconds)
        r = results[key]
        print(f"  {name:9s} {key:12s} coef {r['best_coefficient']!s:6s} behaviour {r['behaviour_rate']:.2f} "
              f"retention {r['content_retention']} fluency {r['fluency']:.3f} KL {r['kl']:.3f} "
              f"score {r['test_score']:.3f} ({seconds:.1f} s fit)", flush=True)

    start = time.perf_counter()
    record("base", sweep(model, tok, BaseMethod(), None, data, **common), 0.0)
    record("prompt", sweep(model, tok, PromptMethod(spec["instruction"]), None, data, **common), 0.0)
    for key, method, options in (("mean_diff", "mean_diff", {}), ("pca", "pca", {"variant": "diff_centered"})):
        t0 = time.perf_counter()
        vector = extract(model, tok, pairs, method, layers=[cfg["layer"]], read="completion_mean", chat=True,
                         unit="hidden_norm", batch_size=cfg["batch_size"], **options)
        fit = time.perf_counter() - t0
        report = sweep(model, tok, VectorMethod(vector, scope=cfg["scope"]), cfg["grid_hidden_norm"], data, **common)
        record(key, report, fit)
        results[key]["extraction"] = {k: vector.report["sites"][vector.sites[0]].get(k)
                                      for k in ("consistency", "relative_norm", "cosine_to_mean_diff",
                                                "explained_variance")}
    t0 = time.perf_counter()
    positive, negative = spec["actadd"]
    vector = actadd(model, tok, positive, negative, layers=[cfg["layer"]])
    fit = time.perf_counter() - t0
    record("actadd", sweep(model, tok, VectorMethod(vector), cfg["grid_actadd"], data, **common), fit)
    rows = [{"prompt": p["prompt"], "completion": p["positive"]} for p in pairs]
    examples = encode(tok, rows, "sft", chat=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for rank in cfg["reft_ranks"]:
        reft = ReftModel(model, ReftConfig(method="loreft", rank=rank, seed=cfg["seed"], **cfg["reft"]))
        state = train(reft, examples, TrainArgs(seed=cfg["seed"], progress=False, **cfg["reft_train"]),
                      task="sft", pad_token_id=pad)
        reft.eval()
        try:
            report = sweep(model, tok, AdapterMethod(reft), None, data, **common)
        finally:
            reft.unload()
        record(f"loreft_r{rank}", report, state["train_seconds"])
        results[f"loreft_r{rank}"]["train_steps"] = state["step"]
        results[f"loreft_r{rank}"]["final_loss"] = round(state["losses"][-1], 4)
    return {"check": spec["check"], "instruction": spec["instruction"], "actadd_pair": list(spec["actadd"]),
            "train_pairs": len(pairs), "example_pair": pairs[0], "methods": results,
            "seconds": round(time.perf_counter() - start, 1)}


def run_layer_sweep(model, tok, cfg: dict, base_train: list, shared: dict) -> dict:
    from reftkit.steer.evaluate import layer_sweep
    from reftkit.steer.extract import extract

    ls = cfg["layer_sweep"]
    spec = BEHAVIOURS[ls["behaviour"]]
    pairs = [{"prompt": p, "positive": spec["transform"](r), "negative": r} for p, r in zip(TRAIN_PROMPTS, base_train)
             if r]
    vector = extract(model, tok, pairs, "mean_diff", layers=ls["layers"], read="completion_mean", chat=True,
                     unit="hidden_norm", batch_size=cfg["batch_size"])
    report = layer_sweep(model, tok, vector, ls["grid"], {"prompts": HELDOUT_PROMPTS, "facts": FACTS,
                                                          "neutral": NEUTRAL},
                         kl_budget=ls["kl_budget"], scope=cfg["scope"], behaviour_spec=spec["check"],
                         seed=cfg["seed"], max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"])
    test = report["test"]["metrics"]
    return {"behaviour": ls["behaviour"], "settings": ls, "kl_budget": report["kl_budget"],
            "best_site": report["best_site"],
            "best_coefficient": report["best_coefficient"], "test_score": round(report["test"]["score"], 4),
            "test": {k: test.get(k) for k in ("behaviour_rate", "content_retention", "fluency", "kl", "distinct_2")},
            "frontier": {site: [{"coefficient": p["coefficient"], "behaviour_rate": p["metrics"]["behaviour_rate"],
                                 "kl": round(p["metrics"]["kl"], 4), "score": round(p["score"], 4),
                                 "within_budget": p["within_budget"]} for p in entry["validation"]]
                         for site, entry in report["sites"].items()}}


def run_recipes(model, tok, cfg: dict, base_train: list, shared: dict, names: list) -> dict:
    """All-caps LoReFT recipes trained on the base model's own answers (upper-cased), each scored on the same
    halves as the main table: the search for >= 90% behaviour and >= 80% of the facts kept."""
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.data import encode
    from reftkit.reft.model import ReftModel
    from reftkit.reft.train import TrainArgs, train
    from reftkit.steer.evaluate import AdapterMethod, sweep

    extra = [trim(r) for r in greedy(model, tok, EXTRA_FACT_PROMPTS, cfg["train_reply_tokens"], cfg["batch_size"])]
    rows_24 = [{"prompt": p, "completion": r.upper()} for p, r in zip(TRAIN_PROMPTS, base_train) if r]
    rows_48 = rows_24 + [{"prompt": p, "completion": r.upper()} for p, r in zip(EXTRA_FACT_PROMPTS, extra) if r]
    data = {"prompts": HELDOUT_PROMPTS, "facts": FACTS, "neutral": NEUTRAL}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {"extra_train_replies": dict(zip(EXTRA_FACT_PROMPTS, extra)), "recipes": {}}
    for name in names:
        r = RECIPES[name]
        rows = rows_48 if r["extra"] else rows_24
        reft = ReftModel(model, ReftConfig(method="loreft", rank=r["rank"], layers=r["layers"],
                                           positions=r["positions"], tied=True, seed=cfg["seed"]))
        state = train(reft, encode(tok, rows, "sft", chat=True),
                      TrainArgs(epochs=r["epochs"], batch_size=8, lr=r["lr"], seed=cfg["seed"], progress=False),
                      task="sft", pad_token_id=pad)
        reft.eval()
        try:
            report = sweep(model, tok, AdapterMethod(reft), None, data, behaviour_spec="all_caps", seed=cfg["seed"],
                           max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["batch_size"], _shared=shared)
        finally:
            reft.unload()
        res = summary(report, state["train_seconds"])
        res.update(recipe=r, train_examples=len(rows), train_steps=state["step"],
                   meets_target=bool(res["behaviour_rate"] >= 0.9 and (res["content_retention"] or 0) >= 0.8))
        out["recipes"][name] = res
        print(f"  recipe {name}: behaviour {res['behaviour_rate']:.2f} retention {res['content_retention']} "
              f"validation {report['validation'][0]['metrics']['behaviour_rate']:.2f}/"
              f"{report['validation'][0]['metrics']['content_retention']} ({state['train_seconds']:.0f} s)",
              flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["behaviours"])
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        methods = results["behaviours"][name]["methods"]
        keys = list(methods)
        ax = axes[0][col]
        width = 0.27
        for k, (metric, label) in enumerate((("behaviour_rate", "behaviour"), ("content_retention", "retention"),
                                            ("test_score", "score"))):
            values = [methods[m].get(metric) or 0.0 for m in keys]
            ax.bar([i + (k - 1) * width for i in range(len(keys))], values, width, label=label)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{name}: test half", fontsize=10)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for m in ("mean_diff", "pca"):
            if m not in methods:
                continue
            pts = methods[m]["validation"]
            xs = [p["coefficient"] for p in pts]
            ax.plot(xs, [p["behaviour_rate"] for p in pts], marker="o", label=f"{m} behaviour")
            ax.plot(xs, [p["content_retention"] or 0.0 for p in pts], marker="s", linestyle=":",
                    label=f"{m} retention")
        ax2 = ax.twinx()
        for m in ("mean_diff", "pca"):
            if m in methods:
                pts = methods[m]["validation"]
                ax2.plot([p["coefficient"] for p in pts], [p["kl"] for p in pts], color="grey", alpha=0.6,
                         linestyle="--", label=f"{m} KL")
        ax.set_xlabel("coefficient (x typical |h| at the layer)")
        ax.set_ylim(0, 1.05)
        ax2.set_ylabel("KL to base (nats/token)", fontsize=8)
        ax.set_title(f"{name}: validation sweep", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run into steer_quality_quick.*")
    parser.add_argument("--behaviours", default=",".join(BEHAVIOURS), help="comma-separated behaviours")
    parser.add_argument("--no-layer-sweep", action="store_true", help="skip the layers x strengths sweep")
    parser.add_argument("--recipes", metavar="NAMES",
                        help="also the all-caps recipe search (comma-separated names of RECIPES, or 'all')")
    parser.add_argument("--merge", action="store_true",
                        help="add to the existing results file (its other behaviours are kept) instead of a new one")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else SETTINGS
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from reftkit.models import load_model

    run_start = t0 = time.perf_counter()
    model, tok = load_model(MODEL_NAME, dtype="float32", device="cpu")
    model.eval()
    load_s = time.perf_counter() - t0
    print(f"loaded {MODEL_NAME} in {load_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    base_train = [trim(r) for r in greedy(model, tok, TRAIN_PROMPTS, cfg["train_reply_tokens"], cfg["batch_size"])]
    base_heldout = [trim(r) for r in greedy(model, tok, HELDOUT_PROMPTS, cfg["train_reply_tokens"],
                                            cfg["batch_size"])]
    data_s = time.perf_counter() - t0
    shared: dict = {}
    out = HERE / "results" / ("steer_quality_quick.json" if args.quick else "steer_quality.json")
    fresh = {"benchmark": "steer_quality", "model": MODEL_NAME, "machine": machine_info(cfg["threads"]),
             "settings": {k: v for k, v in cfg.items()}, "quick": args.quick, "load_seconds": round(load_s, 1),
             "data_seconds": round(data_s, 1),
             "data": {"train_prompts": len(TRAIN_PROMPTS), "heldout_prompts": len(HELDOUT_PROMPTS),
                      "facts": len(FACTS), "neutral_texts": len(NEUTRAL)},
             "base_train_replies": dict(zip(TRAIN_PROMPTS, base_train)), "behaviours": {}, "runs": []}
    results = json.loads(out.read_text()) if args.merge and out.exists() else fresh
    results.setdefault("runs", [])
    results["runs"].append({"argv": sys.argv[1:], "machine": machine_info(cfg["threads"])})

    def save():
        out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        if results["behaviours"]:
            plot(results, out.with_suffix(".png"))

    for name in [n for n in args.behaviours.split(",") if n]:
        results["behaviours"][name] = run_behaviour(model, tok, name, BEHAVIOURS[name], cfg, base_train,
                                                    base_heldout, shared)
        save()
    if args.recipes:
        names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
        t0 = time.perf_counter()
        results["recipe_search"] = run_recipes(model, tok, cfg, base_train, shared, names)
        results["recipe_search"]["seconds"] = round(time.perf_counter() - t0, 1)
        save()
    if not args.no_layer_sweep:
        t0 = time.perf_counter()
        results["layer_sweep"] = run_layer_sweep(model, tok, cfg, base_train, shared)
        results["layer_sweep"]["seconds"] = round(time.perf_counter() - t0, 1)
    results["runs"][-1]["seconds"] = round(time.perf_counter() - run_start, 1)
    save()
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
