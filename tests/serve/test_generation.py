"""The batch engine without HTTP: rows for different adapters and steering settings in one `generate` give the
tokens each row gets alone, and the library's own paths (`ReftModel.generate`, `steer`) agree with it; seeded
sampling does not depend on the batch; stop strings, eos and lengths finish rows; the incremental detokeniser."""

from __future__ import annotations

import pytest
import torch

from reftkit.chat import prompt_ids
from reftkit.reft.model import ReftModel
from reftkit.serve.generation import BatchEngine
from reftkit.serve.row import Row
from reftkit.serve.streaming import IncrementalText
from reftkit.steer import SteeringVector, steer

from .util import model_and_tokenizer

pytestmark = pytest.mark.numerics
PROMPTS = ["hello there", "a longer prompt about cats", "x", "what is two plus two?", "tell me a story", "hi"]


@pytest.fixture(scope="module")
def engine(assets):
    model, tok = model_and_tokenizer()
    reft = ReftModel(model)
    for name, folder in assets["adapters"].items():
        reft.load_adapter(folder, name)
    vectors = {"happy": SteeringVector.load(assets["vectors"]["happy"])}
    return BatchEngine(reft, tok, vectors)


def run(engine, rows):
    """-> per row: (token ids, text, finish reason)."""
    events = []
    for r in rows:
        r.emit = events.append
    engine.run(rows)
    out = []
    for r in rows:
        text = "".join(e[2] for e in events if e[0] == "text" and e[1] is r)
        done = [e for e in events if e[0] == "done" and e[1] is r]
        assert len(done) == 1
        out.append((text, done[0][2], done[0][3]))
    return out


def tokens_of(engine, rows, **kwargs):
    """The generated token ids of each row, read from the streamer's own record."""
    from reftkit.serve import streaming

    seen = {}
    original = streaming.BatchStreamer.close

    def close(self, reason="length"):
        original(self, reason)
        for r, t in zip(self.rows, self.texts):
            seen[id(r)] = list(t.ids)

    streaming.BatchStreamer.close = close
    try:
        engine.run(rows)
    finally:
        streaming.BatchStreamer.close = original
    return [seen[id(r)] for r in rows]


SPECS = [dict(), dict(adapter="caps"), dict(adapter="pirate"), dict(steer=(("happy", 2.0),)),
         dict(adapter="brief", steer=(("happy", -1.5),)), dict(steer=(("happy", 0.5),))]


def rows_for(engine, specs, max_tokens=10):
    return [Row(ids=prompt_ids(engine.tokenizer, p), max_tokens=max_tokens, **s) for p, s in zip(PROMPTS, specs)]


def test_mixed_batch_equals_each_row_alone(engine):
    mixed = tokens_of(engine, rows_for(engine, SPECS))
    for i, spec in enumerate(SPECS):
        alone = tokens_of(engine, [rows_for(engine, SPECS)[i]])[0]
        assert mixed[i] == alone, spec
    base = tokens_of(engine, rows_for(engine, [{}] * len(SPECS)))
    assert all(mixed[i] != base[i] for i in range(1, len(SPECS))), "adapters and vectors must change the reply"


def test_rows_agree_with_the_library_paths(engine):
    """An adapter row equals `ReftModel.generate`, a steered row equals `steer(...).generate`."""
    tok, reft = engine.tokenizer, engine.reft
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=engine.pad, eos_token_id=sorted(engine.eos))
    ids = torch.tensor([prompt_ids(tok, PROMPTS[1])])
    mask = torch.ones_like(ids)
    expected = reft.generate(ids, mask, adapter_names=["caps"], **kw)[0, ids.shape[1]:].tolist()
    assert tokens_of(engine, [Row(ids=ids[0].tolist(), adapter="caps", max_tokens=8)])[0] == expected[:8]
    with steer(reft.model, [(engine.vectors["happy"], 2.0)]) as steered:
        expected = steered.generate(ids, mask, **kw)[0, ids.shape[1]:].tolist()
    assert tokens_of(engine, [Row(ids=ids[0].tolist(), steer=(("happy", 2.0),), max_tokens=8)])[0] == expected[:8]


def test_coefficient_zero_is_the_base_model(engine):
    rows = rows_for(engine, [dict(steer=(("happy", 0.0),)), dict(steer=(("happy", 2.0),))])
    base = rows_for(engine, [dict(), dict()])
    assert tokens_of(engine, rows)[0] == tokens_of(engine, base)[0]


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    def sampled(seed):
        return Row(ids=prompt_ids(engine.tokenizer, "sample me"), max_tokens=12, temperature=0.9, top_p=0.9,
                   seed=seed)

    alone = tokens_of(engine, [sampled(7)])[0]
    mixed = tokens_of(engine, [*rows_for(engine, SPECS[:3]), sampled(7)])[3]
    assert alone == mixed
    assert tokens_of(engine, [sampled(8)])[0] != alone  # the seed matters


def test_finish_reasons_and_stop_strings(engine):
    row = Row(ids=prompt_ids(engine.tokenizer, PROMPTS[0]), max_tokens=12)
    (text, reason, n), = run(engine, [row])
    assert reason == "length" and n == 12
    stop = text[3:5]
    cut = text[:text.index(stop)]
    short = Row(ids=list(row.ids), max_tokens=12, stop=[stop])
    longer = Row(ids=prompt_ids(engine.tokenizer, PROMPTS[1]), max_tokens=5)
    (t1, r1, _), (t2, r2, n2) = run(engine, [short, longer])
    assert (t1, r1) == (cut, "stop")
    assert r2 == "length" and n2 == 5


def test_cancelled_row_stops_and_the_others_do_not_notice(engine):
    rows = rows_for(engine, SPECS[:3], max_tokens=10)
    undisturbed = tokens_of(engine, rows_for(engine, SPECS[:3], max_tokens=10))
    events, at = [], []

    def emit(event):
        events.append(event)
        if event[0] == "text" and event[1] is rows[1] and not rows[1].cancelled:
            rows[1].cancelled = True
            at.append(sum(1 for e in events if e[0] == "text" and e[1] is rows[1]))

    for r in rows:
        r.emit = emit
    got = tokens_of(engine, rows)
    assert got[0] == undisturbed[0] and got[2] == undisturbed[2]
    assert len(got[1]) < 10 and got[1] == undisturbed[1][:len(got[1])]  # no token after the step it was cancelled
    assert [e[2] for e in events if e[0] == "done" and e[1] is rows[1]] == ["cancelled"]


def test_incremental_text_holds_partial_characters_and_stop_prefixes():
    _, tok = model_and_tokenizer()
    text = IncrementalText(tok, [])
    bytes_ = tok("é", add_special_tokens=False)["input_ids"]
    assert len(bytes_) == 2  # a byte-level tokenizer: é is two tokens
    assert text.add(bytes_[0]) == ("", False)
    assert text.add(bytes_[1]) == ("é", False)
    text = IncrementalText(tok, ["END"])
    out = [text.add(t) for t in tok("abEN", add_special_tokens=False)["input_ids"]]
    assert "".join(o[0] for o in out) == "ab" and not any(o[1] for o in out)  # "EN" may start "END": held back
    assert text.add(tok("D", add_special_tokens=False)["input_ids"][0]) == ("", True)
    text = IncrementalText(tok, ["END"])
    for t in tok("abEN", add_special_tokens=False)["input_ids"]:
        text.add(t)
    assert text.flush() == "EN"  # the reply ended without the stop string: the held text belongs to it
