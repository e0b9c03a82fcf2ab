"""`reftkit steer extract / inspect` and `reftkit generate --steer` on tiny-llama (run in-process through
`main(argv)`): the vector folder, the refusal to overwrite it, bad configs and pairs failing before any model is
loaded, coefficient 0 giving the unsteered reply, a vector of another model refused, and the shipped example
config being valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import reftkit.models
from reftkit.cli import main
from reftkit.steer.config import load_steer_config
from reftkit.steer.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [{"positive": "I am delighted to help you today.", "negative": "ugh, fine, whatever."},
         {"positive": "Thank you kindly for your patience.", "negative": "hurry up already."},
         {"positive": "It would be my pleasure.", "negative": "not my problem."}]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _config(folder: Path, rows=PAIRS, **keys) -> Path:
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": "tiny-llama", "pairs": "data/pairs.jsonl", "layers": [1, 2], "chat": False, **keys}
    path = folder / "vec.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"load_model was called with {args}")

    monkeypatch.setattr(reftkit.models, "load_model", refuse)


def test_extract_writes_the_vector_folder_and_refuses_to_overwrite_it(tmp_path, capsys):
    config = _config(tmp_path, unit="mean_diff_norm")
    code, out, err = run(capsys, "steer", "extract", str(config), "--device", "cpu")
    assert code == 0, err
    folder = tmp_path / "runs" / "vec"  # the default output: runs/<config stem> beside the config
    vector = SteeringVector.load(folder)
    assert vector.sites == ["L1.block_output", "L2.block_output"] and vector.unit == "mean_diff_norm"
    assert vector.counts == {"positive": 3, "negative": 3} and vector.model_hint["hidden_size"] == 64
    lines = out.splitlines()
    assert lines[0].split() == ["SITE", "|v|", "|h|", "|v|/|h|", "CONSISTENCY"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:3]}
    for site, info in vector.report["sites"].items():
        assert float(rows[site][0]) == pytest.approx(info["norm"], rel=1e-3)
        assert float(rows[site][2]) == pytest.approx(info["relative_norm"], rel=1e-3)
        assert float(rows[site][3]) == pytest.approx(info["consistency"], abs=1e-3)
    assert lines[-1] == f"vector: {folder}"
    assert "extracting a mean_diff vector from 3 pair(s)" in err
    before = (folder / "vectors.safetensors").read_bytes()

    code, out, err = run(capsys, "steer", "extract", str(config))
    assert code == 2 and out == ""
    assert err.startswith("error: output folder") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (folder / "vectors.safetensors").read_bytes() == before

    _config(tmp_path, rows=PAIRS[:2], unit="mean_diff_norm")
    code, out, err = run(capsys, "steer", "extract", str(config), "--overwrite", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["output"] == str(folder) and doc["report"]["counts"] == {"positive": 2, "negative": 2}
    assert SteeringVector.load(folder).counts == {"positive": 2, "negative": 2}
    assert sorted(p.name for p in tmp_path.joinpath("runs").iterdir()) == ["vec"]  # no staging folder left


def test_inspect_reads_the_folder(tmp_path, capsys):
    config = _config(tmp_path, method="pca", options={"variant": "pair_centered"}, output="out/v")
    assert run(capsys, "steer", "extract", str(config))[0] == 0
    code, out, err = run(capsys, "steer", "inspect", str(tmp_path / "out" / "v"))
    assert code == 0, err
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith("L"))
    assert fields["method"].strip() == "pca" and fields["unit"].strip() == "raw"
    assert fields["sites"].strip() == "L1.block_output, L2.block_output (2)"
    assert fields["pairs"].strip() == "3 positive, 3 negative"
    assert "tiny-llama" in fields["model"]
    code, out, _ = run(capsys, "steer", "inspect", str(tmp_path / "out" / "v"), "--json")
    assert code == 0 and json.loads(out)["method"] == "pca"
    code, _, err = run(capsys, "steer", "inspect", str(tmp_path))
    assert code == 2 and err.startswith("error: no vector_config.json in")


@pytest.mark.parametrize("change, rows, message", [
    ({"method": "svd"}, PAIRS, "unknown method 'svd'"),
    ({"colour": "red"}, PAIRS, "unknown keys ['colour']"),
    ({"options": {"variant": "x"}}, PAIRS, "takes options"),
    ({"layers": [-1]}, PAIRS, "layers must be"),
    ({"chat": "yes"}, PAIRS, "chat must be true or false"),
    ({"unit": "volts"}, PAIRS, "unknown unit 'volts'"),
    ({"pairs": "data/missing.jsonl"}, PAIRS, "pairs file"),
    ({"read": "answer"}, PAIRS, "read='answer' reads completion tokens"),
    ({"method": "actadd"}, PAIRS, "actadd takes exactly one"),
    ({}, PAIRS[:1] + [{"positive": "a", "negativ": "b"}], "line 2: expected keys"),
    ({}, PAIRS + [{"positive": 3, "negative": "b"}], "line 4: positive must be a string"),
    ({}, [], "holds no pairs"),
])
def test_bad_config_or_pairs_fail_before_the_model_loads(tmp_path, capsys, no_model_load, change, rows, message):
    config = _config(tmp_path, rows=rows, **change)
    code, out, err = run(capsys, "steer", "extract", str(config))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_bad_yaml_and_bad_rows_fail_before_the_model_loads(tmp_path, capsys, no_model_load):
    config = tmp_path / "vec.yaml"
    config.write_text("model: !!python/object/apply:os.system ['true']\npairs: p.jsonl\n")
    code, _, err = run(capsys, "steer", "extract", str(config))
    assert code == 2 and "is not valid YAML" in err
    _config(tmp_path)
    (tmp_path / "data" / "pairs.jsonl").write_text('{"positive": "a", "negative": "b"}\nnot json\n')
    code, _, err = run(capsys, "steer", "extract", str(tmp_path / "vec.yaml"))
    assert code == 2 and "pairs.jsonl, line 2: not a JSON object" in err
    code, _, err = run(capsys, "steer", "extract", str(tmp_path / "vec.yaml"), "--device", "toaster")
    assert code == 2 and err.startswith("error:")


def test_generate_with_coefficient_0_is_the_plain_reply_and_a_vector_of_another_model_is_refused(tmp_path, capsys):
    config = _config(tmp_path, unit="mean_diff_norm")
    assert run(capsys, "steer", "extract", str(config))[0] == 0
    folder = str(tmp_path / "runs" / "vec")
    common = ["generate", "--model", "tiny-llama", "--prompt", "hello there", "--prompt", "hi", "--max-new-tokens",
              "6", "--no-chat", "--json"]
    code, plain, err = run(capsys, *common)
    assert code == 0, err
    code, zero, err = run(capsys, *common, "--steer", folder, "--coefficient", "0")
    assert code == 0, err
    assert json.loads(zero) == json.loads(plain)
    code, strong, err = run(capsys, *common, "--steer", folder, "--coefficient", "400", "--scope", "all")
    assert code == 0, err
    assert json.loads(strong)["outputs"] != json.loads(plain)["outputs"]
    code, _, err = run(capsys, *common, "--steer", folder, "--scope", "nowhere")
    assert code == 2 and "--scope 'nowhere'" in err
    code, _, err = run(capsys, *common, "--coefficient", "2")
    assert code == 2 and "--coefficient needs --steer" in err
    code, _, err = run(capsys, "generate", "--model", "tiny-gpt2", "--prompt", "hi", "--steer", folder)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "does not fit tiny-gpt2: model type 'llama' vs 'gpt2'" in errors[0], err
    assert "loading tiny-gpt2" not in err  # refused from its config, before the weights load


def test_generate_refuses_a_vector_of_another_model_before_loading(tmp_path, capsys, monkeypatch):
    config = _config(tmp_path)
    assert run(capsys, "steer", "extract", str(config))[0] == 0
    vector = SteeringVector.load(tmp_path / "runs" / "vec")
    vector.model_hint = {**vector.model_hint, "num_layers": 7}
    vector.save(tmp_path / "other")
    monkeypatch.setattr(reftkit.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("load")))
    code, _, err = run(capsys, "generate", "--model", "tiny-llama", "--prompt", "hi", "--steer", str(tmp_path / "other"))
    assert code == 2 and "num layers 7 vs 4" in err


def test_the_example_config_is_valid():
    cfg = load_steer_config(ROOT / "examples" / "steer" / "formal.yaml")
    assert cfg["model"] == "smollm2-135m-instruct" and cfg["method"] == "mean_diff" and cfg["layers"] == [6]
    assert len(cfg["pairs_rows"]) >= 8 and all("prompt" in row for row in cfg["pairs_rows"])
    assert Path(cfg["output"]) == ROOT / "examples" / "steer" / "runs" / "formal"


def test_export_writes_gguf_and_lm_eval_files_and_refuses_to_overwrite_them(tmp_path, capsys):
    pytest.importorskip("gguf")
    from reftkit.steer import formats

    config = _config(tmp_path)
    assert run(capsys, "steer", "extract", str(config))[0] == 0
    folder = str(tmp_path / "runs" / "vec")
    target = tmp_path / "vec.gguf"
    code, out, err = run(capsys, "steer", "export", folder, "--gguf", str(target))
    assert code == 0, err
    assert out.strip() == f"wrote {target}"
    back, vector = formats.import_gguf(target), SteeringVector.load(folder)
    assert set(back.sites) == set(vector.sites)
    for site in vector.sites:
        assert torch.equal(back.directions[site], vector.directions[site])
    before = target.read_bytes()
    code, _, err = run(capsys, "steer", "export", folder, "--gguf", str(target))
    assert code == 2 and "exists; pass --overwrite" in err and target.read_bytes() == before
    assert run(capsys, "steer", "export", folder, "--gguf", str(target), "--overwrite")[0] == 0
    pt = tmp_path / "vec.pt"
    code, _, err = run(capsys, "steer", "export", folder, "--lm-eval", str(pt), "--coefficient", "2")
    assert code == 0, err
    assert pt.is_file() and pt.stat().st_size > 0
    code, _, err = run(capsys, "steer", "export", folder)
    assert code == 2 and "one of the arguments --gguf --lm-eval is required" in err


def _reference_replies(model, tok, prompts, plan, new=6):
    """Greedy replies steered by `plan` ([(vector, coefficient)] on `model`, which may be a ReftModel), built
    through the library, as `generate` should make them."""
    from reftkit.chat import left_padded
    from reftkit.steer import steer

    batch = left_padded(tok, prompts, False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else batch["input_ids"][0, 0].item()
    with torch.no_grad(), steer(model, plan) as s:
        out = s.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=new, do_sample=False,
                         pad_token_id=pad)
    T = batch["input_ids"].shape[1]
    return [tok.decode(o[T:], skip_special_tokens=True).strip() for o in out]


def _two_vectors(tmp_path):
    g = torch.Generator().manual_seed(5)
    for name, site in (("a", "L1.block_output"), ("b", "L2.block_output")):
        SteeringVector({site: 40 * torch.randn(64, generator=g)}).save(tmp_path / name)
    return str(tmp_path / "a"), str(tmp_path / "b")


PROMPTS = ["hello there", "hi", "a longer prompt here"]
GENERATE = ["generate", "--model", "tiny-llama", "--max-new-tokens", "6", "--no-chat", "--json"] + \
    [x for p in PROMPTS for x in ("--prompt", p)]


def _outputs(text):
    return [o["reply"] for o in json.loads(text)["outputs"]]


def test_generate_composes_several_vectors_each_with_its_coefficient(tmp_path, capsys):
    a, b = _two_vectors(tmp_path)
    model, tok = reftkit.models.load_model("tiny-llama")
    code, out, err = run(capsys, *GENERATE, "--steer", f"{a}:2", "--steer", f"{b}:-1.5")
    assert code == 0, err
    va, vb = SteeringVector.load(a), SteeringVector.load(b)
    assert _outputs(out) == _reference_replies(model, tok, PROMPTS, [(va, 2.0), (vb, -1.5)])
    assert _outputs(out) != _reference_replies(model, tok, PROMPTS, [(va, 2.0)])
    code, default, err = run(capsys, *GENERATE, "--steer", a, "--steer", f"{b}:-1.5", "--coefficient", "2")
    assert code == 0 and default == out  # --coefficient is the default of entries without their own
    code, zero, _ = run(capsys, *GENERATE, "--steer", f"{a}:0", "--steer", f"{b}:0")
    code, plain, _ = run(capsys, *GENERATE)
    assert json.loads(zero) == json.loads(plain)
    code, _, err = run(capsys, *GENERATE, "--steer", f"{a}:strong")
    assert code == 2 and "expected DIR or DIR:C with a number C, got 'strong'" in err
    code, _, err = run(capsys, *GENERATE, "--steer", f"{a}:nan")
    assert code == 2 and f"--steer {a}:nan" in err


def test_generate_with_an_adapter_and_vectors_in_one_call(tmp_path, capsys):
    from reftkit.reft.config import ReftConfig
    from reftkit.reft.model import ReftModel

    a, b = _two_vectors(tmp_path)
    model, tok = reftkit.models.load_model("tiny-llama")
    ReftModel(model, ReftConfig(rank=4, layers=[0, 2], positions="l1")).save_pretrained(tmp_path / "adapter")
    code, out, err = run(capsys, *GENERATE, "--adapter", str(tmp_path / "adapter"), "--steer", f"{a}:2",
                         "--steer", f"{b}:1")
    assert code == 0, err
    assert "with the adapter" in err
    model, tok = reftkit.models.load_model("tiny-llama")
    reft = ReftModel.from_pretrained(model, tmp_path / "adapter")
    try:
        expected = _reference_replies(reft, tok, PROMPTS, [(SteeringVector.load(a), 2.0),
                                                          (SteeringVector.load(b), 1.0)])
    finally:
        reft.unload()
    assert _outputs(out) == expected
    code, adapter_only, _ = run(capsys, *GENERATE, "--adapter", str(tmp_path / "adapter"))
    assert _outputs(adapter_only) != expected
    code, zero, _ = run(capsys, *GENERATE, "--adapter", str(tmp_path / "adapter"), "--steer", f"{a}:0")
    assert json.loads(zero)["outputs"] == json.loads(adapter_only)["outputs"]


def test_generate_with_a_condition_steers_only_the_prompts_that_fire(tmp_path, capsys):
    from reftkit.steer.condition import Condition

    a, _ = _two_vectors(tmp_path)
    SteeringVector({"L1.block_output": torch.randn(64, generator=torch.Generator().manual_seed(8))}).save(
        tmp_path / "cond")
    model, tok = reftkit.models.load_model("tiny-llama")
    probe = Condition.from_vector(SteeringVector.load(tmp_path / "cond"), threshold=0.0)
    sims = probe.similarities(model, tok, PROMPTS, chat=False).tolist()
    threshold = sorted(sims)[0] + 1e-6  # every prompt but the least similar fires
    fired = [s > threshold for s in sims]
    assert fired.count(False) == 1
    code, out, err = run(capsys, *GENERATE, "--steer", f"{a}:2", "--condition", str(tmp_path / "cond"),
                         "--threshold", repr(threshold))
    assert code == 0, err
    assert err.count("condition fires") == 2 and err.count("condition does not fire") == 1
    steered = _reference_replies(model, tok, PROMPTS, [(SteeringVector.load(a), 2.0)])
    code, plain, _ = run(capsys, *GENERATE)
    for got, s, p, f in zip(_outputs(out), steered, _outputs(plain), fired):
        assert got == (s if f else p)
    code, below, err = run(capsys, *GENERATE, "--steer", f"{a}:2", "--condition", str(tmp_path / "cond"),
                           "--threshold", "-5", "--condition-fire", "below")
    assert code == 0 and json.loads(below) == json.loads(plain)  # nothing fires: the plain model
    code, _, err = run(capsys, *GENERATE, "--steer", a, "--condition", str(tmp_path / "cond"))
    assert code == 2 and "--condition needs --threshold" in err
    code, _, err = run(capsys, *GENERATE, "--steer", a, "--threshold", "0.5")
    assert code == 2 and "--threshold and --condition-site need --condition" in err
    code, _, err = run(capsys, *GENERATE, "--condition", str(tmp_path / "cond"), "--threshold", "0.5")
    assert code == 2 and "--condition needs --steer" in err
