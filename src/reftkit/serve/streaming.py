"""The batched streamer: each decoding step's `[batch]` tokens fanned out to per-row streams.

transformers' own streamers refuse batches (`TextStreamer` and friends handle batch size 1). `BatchStreamer`
is a `StoppingCriteria`: `generate` calls it after every step with the sequences including the new tokens, before
the next forward, so it sees each token as soon as it exists and its answer ("this row is finished") takes effect
in the same step. For every unfinished row it

- detokenises incrementally (`IncrementalText`): only a window from the previous read offset is decoded, and text
  that ends inside a multi-byte character (`\\ufffd`) is held back until the character is complete;
- applies the stop strings: text that could still be the start of a stop string is held back, the reply is cut
  just before a stop string, and the row finishes with `stop`; an end-of-sequence token also finishes it with
  `stop`, and reaching the row's own `max_tokens` with `length`;
- finishes a cancelled row (its client went away, or it timed out) at this step without emitting anything.

Events go out through the row's `emit`: `("text", row, delta)` and `("done", row, finish_reason, tokens)`; a
cancelled row gets `("done", row, "cancelled", tokens)`. Finished rows still occupy their place in the batch's
tensors until the batch ends (static batching), but emit nothing and stop nothing else.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria


class IncrementalText:
    """Decoded text of a growing token list, with stop strings held back and cut."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix = 0   # decode window start
        self.read = 0     # tokens already turned into text
        self.text = ""
        self.sent = 0     # characters of `text` already emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token -> (text to emit now, whether a stop string was reached)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            cut = min((j for j in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if j >= 0),
                      default=-1)
            if cut >= 0:
                out = self.text[self.sent:cut]
                self.text, self.sent = self.text[:cut], cut
                return out, True
        safe = len(self.text) - self._held()
        if safe > self.sent:
            out, self.sent = self.text[self.sent:safe], safe
            return out, False
        return "", False

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """The rest of the text when the row ends without a stop string: held-back characters, and tokens still
        waiting for the rest of a multi-byte character (decoded as they are)."""
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.prefix = self.read = len(self.ids)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class BatchStreamer(StoppingCriteria):
    def __init__(self, tokenizer, rows, eos_ids, on_token=None):
        self.rows = rows
        self.eos = set(int(e) for e in eos_ids)
        self.texts = [IncrementalText(tokenizer, r.stop) for r in rows]
        self.done = torch.zeros(len(rows), dtype=torch.bool)
        self.on_token = on_token  # called once per step with the count of tokens emitted (metrics)
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        tokens = input_ids[:, -1].tolist()
        self.steps += 1
        emitted = 0
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            if row.finished:
                continue
            text = self.texts[i]
            if row.cancelled:
                self._finish(i, "cancelled")
                continue
            if token in self.eos:
                text.ids.append(token)
                self._emit_rest(i)
                self._finish(i, "stop")
                continue
            delta, stopped = text.add(token)
            emitted += 1
            if delta:
                row.emit(("text", row, delta))
            if stopped:
                self._finish(i, "stop")
            elif len(text.ids) >= row.max_tokens:
                self._emit_rest(i)
                self._finish(i, "length")
        if self.on_token is not None and emitted:
            self.on_token(emitted)
        return self.done.to(input_ids.device).clone()

    def _emit_rest(self, i: int) -> None:
        rest = self.texts[i].flush()
        if rest:
            self.rows[i].emit(("text", self.rows[i], rest))

    def _finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        row.finished = True
        self.done[i] = True
        row.emit(("done", row, reason, len(self.texts[i].ids)))

    def close(self, reason: str = "length") -> None:
        """After `generate` returned: finish every row it left unfinished (the batch's length limit)."""
        for i, row in enumerate(self.rows):
            if not row.finished:
                if row.cancelled:
                    self._finish(i, "cancelled")
                else:
                    self._emit_rest(i)
                    self._finish(i, reason)
