"""Positions: *which tokens* an intervention reads and writes.

A `Positions` value is a small immutable selector; `resolve(region)` turns it into index tensors for one batch.
`region` is a boolean `[batch, seq]` mask of the tokens the selector counts over: the attention mask for a
plain forward, the prompt part of it for training and generation. "First" and "last" are therefore counted over
real tokens, so left and right padding give the same tokens.

Resolution yields a `Located`: `index [batch, K]` plus `valid [batch, K]`. Rows with fewer than K selected tokens
are padded by repeating their first valid slot (`canon` names the slot each one copies), so gather and scatter
stay one vectorised op each and duplicate writes always carry the same value. Rows with nothing selected are
flagged in `row_valid` and left untouched by the engine. `all_rows` records, as a Python bool computed once at
resolution, that every row has a full set of slots, so the engine needs no device sync to know it.

Kinds: `first_last` ("f3+l3", "f2", "l1", "first", "last"), `all`, `span` (real-token offsets, per example or
shared), `indices` (absolute positions, `-1` = none), `mask` (absolute boolean mask).

Short rows: selectors counted over real tokens (`first_last`, `span`) are clamped to each row's real tokens,
never an error, so one selector serves a batch of prompts of any length (pyreft clamps first/last-k the same
way). `fK` takes min(K, n) tokens of an n-token row; with `lM` as well the first part takes at most half the
row (rounded up) and the last part the rest, so `f5+l5` on a 3-token row picks each token once. A span keeps
its part that lies within the real tokens, so `span:0:K` always selects what `fK` selects; a span that starts
at or past the end selects nothing in that row. A row left with nothing is flagged in `row_valid` and the
engine leaves it untouched. Malformed selectors (negative offsets, a span whose start is after its end) are
errors. `indices` and `mask` name absolute positions of the padded sequence, not counts over real tokens, so
a position outside the sequence is an error rather than something to clamp. `scope` only matters in
generation: "prompt" edits the prompt once (baked into the KV cache), "generated" edits each new token,
"all" does both. `Positions.from_pyvene` converts pyvene's nested `unit_locations` lists at the edge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import PositionError

_FL_RE = re.compile(r"^(?:f(?P<f>\d+))?(?:(?(f)\+)l(?P<l>\d+))?$")
SCOPES = ("prompt", "generated", "all")
KINDS = ("first_last", "all", "span", "indices", "mask")


@dataclass(frozen=True)
class Located:
    index: torch.Tensor  # [B, K] long, absolute positions; padded slots repeat a valid one
    valid: torch.Tensor  # [B, K] bool
    row_valid: torch.Tensor  # [B] bool
    canon: torch.Tensor | None  # [B, K] slot each slot copies its value from, None when no slot is padded
    all_rows: bool = False  # every row has all K slots valid (then `canon` is None and `row_valid` all True)
    shared: torch.Tensor | None = None  # [K] distinct positions that every row selects, when that is so

    @property
    def width(self) -> int:
        return self.index.shape[1]

    def expand_batch(self, factor: int) -> "Located":
        """Repeat each row `factor` times (beam search and sampling expand the batch this way)."""
        if factor == 1:
            return self
        rep = lambda t: None if t is None else t.repeat_interleave(factor, dim=0)  # noqa: E731
        return Located(rep(self.index), rep(self.valid), rep(self.row_valid), rep(self.canon), self.all_rows,
                       self.shared)

    @staticmethod
    def cat(parts: "list[Located]") -> "Located":
        """Concatenate selections along the slot axis (e.g. prompt slots and generated slots)."""
        if len(parts) == 1:
            return parts[0]
        index = torch.cat([p.index for p in parts], 1)
        valid = torch.cat([p.valid for p in parts], 1)
        row_valid = torch.stack([p.row_valid for p in parts]).any(0)
        canon = None
        if any(p.canon is not None for p in parts):
            canons, offset = [], 0
            for p in parts:
                k = p.index.shape[1]
                own = p.canon
                if own is None:
                    own = torch.arange(k, device=index.device).expand(index.shape[0], -1)
                canons.append(own + offset)
                offset += k
            canon = torch.cat(canons, 1)
        # parts may select a position twice, so the concatenation makes no claim of distinct shared positions
        return Located(index, valid, row_valid, canon, all(p.all_rows for p in parts))


@dataclass(frozen=True, eq=False)
class Positions:
    kind: str = "first_last"
    first: int = 0
    last: int = 1
    start: "int | torch.Tensor | None" = None
    end: "int | torch.Tensor | None" = None
    tensor: torch.Tensor | None = None
    scope: str = "prompt"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PositionError(f"unknown positions kind {self.kind!r}; expected one of {KINDS}")
        if self.scope not in SCOPES:
            raise PositionError(f"unknown generation scope {self.scope!r}; expected one of {SCOPES}")
        if self.kind == "first_last":
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.first, self.last)):
                raise PositionError(f"first/last counts must be integers, got {self.first!r} and {self.last!r}")
            if self.first < 0 or self.last < 0 or self.first + self.last == 0:
                raise PositionError(f"first/last counts must be >= 0 and not both 0 (got f{self.first}+l{self.last})")
        if self.kind in ("indices", "mask") and not isinstance(self.tensor, torch.Tensor):
            raise PositionError(f"{self.kind} positions need a tensor")

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def first_last(cls, first: int = 0, last: int = 0, scope: str = "prompt") -> "Positions":
        return cls("first_last", first=first, last=last, scope=scope)

    @classmethod
    def all(cls, scope: str = "prompt") -> "Positions":
        return cls("all", scope=scope)

    @classmethod
    def span(cls, start, end, scope: str = "prompt") -> "Positions":
        return cls("span", start=start, end=end, scope=scope)

    @classmethod
    def indices(cls, index, scope: str = "prompt") -> "Positions":
        return cls("indices", tensor=_as_index_tensor(index), scope=scope)

    @classmethod
    def mask(cls, mask: torch.Tensor, scope: str = "prompt") -> "Positions":
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise PositionError("Positions.mask expects a boolean tensor [batch, seq]")
        return cls("mask", tensor=mask.bool(), scope=scope)

    @classmethod
    def generated(cls) -> "Positions":
        """Every generated token, as it is fed back in (nothing on the prompt)."""
        return cls("all", scope="generated")

    @classmethod
    def parse(cls, spec) -> "Positions":
        """Accepts a Positions, a string ("f3+l3", "l1", "first", "last", "all", "generated", "span:2:5"),
        an index tensor / nested list (absolute positions, -1 or None = none), or a dict from `to_dict`."""
        if isinstance(spec, Positions):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, (torch.Tensor, list, tuple)):
            if isinstance(spec, torch.Tensor) and spec.dtype == torch.bool:
                return cls.mask(spec)
            return cls.indices(spec)
        if not isinstance(spec, str):
            raise PositionError(f"cannot use {type(spec).__name__} as positions; expected a string like 'f3+l3'")
        text = spec.strip().lower()
        scope = "prompt"
        if "@" in text:
            text, scope = text.split("@", 1)
        named = {"first": (1, 0), "last": (0, 1)}
        if text in named:
            return cls.first_last(*named[text], scope=scope)
        if text == "all":
            return cls.all(scope=scope)
        if text == "generated":
            return cls.generated()
        if text.startswith("span:"):
            parts = text.split(":")
            if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
                raise PositionError(f"cannot parse {spec!r}; a span is written 'span:START:END' with 0 <= START <= END")
            return cls.span(int(parts[1]), int(parts[2]), scope=scope)
        m = _FL_RE.match(text)
        if not text or not m or (m.group("f") is None and m.group("l") is None):
            raise PositionError(
                f"cannot parse positions {spec!r}; expected 'f<n>', 'l<n>', 'f<n>+l<m>', 'first', 'last', 'all', "
                "'generated', 'span:START:END' (append '@generated' or '@all' for a generation scope), "
                "or an index tensor"
            )
        return cls.first_last(int(m.group("f") or 0), int(m.group("l") or 0), scope=scope)

    @classmethod
    def from_pyvene(cls, unit_locations) -> "tuple[Positions | list[Positions], Positions | list[Positions] | None]":
        """Convert pyvene's `unit_locations` to `(positions, source_positions)`.

        Accepts `{"sources->base": (source_locs, base_locs)}`, `{"sources->base": locs}` (same for both),
        `{"base": locs}`, or a bare int (one position everywhere). `locs` is pyvene's nested
        `[intervention][batch][position]` list; each intervention becomes one `Positions.indices` (in binding
        order, so pass the lists as `positions=` / `source_positions=`). Head-level locations
        (`[intervention][batch][head][position]`) are rejected: heads belong in the site (`L3.H1.head_...`)."""
        if isinstance(unit_locations, int):
            p = cls.indices([unit_locations])
            return p, p
        keys = set(unit_locations) if isinstance(unit_locations, dict) else None
        if not keys or not keys <= {"sources->base", "base"}:
            raise PositionError("pyvene unit_locations must be {'sources->base': (source, base)} or {'base': locs}")
        if "base" in unit_locations:
            return _pyvene_side(unit_locations["base"], "base"), None
        value = unit_locations["sources->base"]
        if isinstance(value, tuple) and len(value) == 2:
            source, base = value
            src = None if source is None else _pyvene_side(source, "source")
            return _pyvene_side(base, "base"), src
        side = _pyvene_side(value, "sources->base")
        return side, side

    # ---- serialisation (tensor-valued selectors are per batch and are not saved) --------------------------
    def to_dict(self) -> dict:
        if self.tensor is not None or isinstance(self.start, torch.Tensor) or isinstance(self.end, torch.Tensor):
            raise PositionError("tensor-valued positions belong to one batch and cannot be saved in a config")
        return {"kind": self.kind, "first": self.first, "last": self.last, "start": self.start, "end": self.end,
                "scope": self.scope}

    @classmethod
    def from_dict(cls, d: dict) -> "Positions":
        allowed = {"kind", "first", "last", "start", "end", "scope"}
        unknown = set(d) - allowed
        if unknown:
            raise PositionError(f"unknown positions fields {sorted(unknown)}; expected {sorted(allowed)}")
        for name in ("start", "end"):
            if d.get(name) is not None and not isinstance(d[name], int):
                raise PositionError(f"positions field {name!r} must be an integer or null, got {d[name]!r}")
        return cls(**d)

    def cache_key(self):
        """A hashable identity: equal selectors share one resolution; tensor-valued ones are keyed by object."""
        if self.tensor is not None or isinstance(self.start, torch.Tensor) or isinstance(self.end, torch.Tensor):
            return ("object", id(self))
        return (self.kind, self.first, self.last, self.start, self.end, self.scope)

    @property
    def depends_on_content(self) -> bool:
        """True when the resolution depends on more than the batch shape of an unpadded region."""
        return self.cache_key()[0] == "object"

    def __repr__(self) -> str:
        if self.kind == "first_last":
            parts = (f"f{self.first}" if self.first else "", f"l{self.last}" if self.last else "")
            body = "+".join(p for p in parts if p)
        elif self.kind == "span":
            body = f"span:{self.start}:{self.end}"
        else:
            body = self.kind
        return f"Positions({body}, scope={self.scope})"

    # ---- resolution ---------------------------------------------------------------------------------------
    def resolve(self, region: torch.Tensor, unpadded: bool | None = None) -> Located:
        """Index tensors for one batch. `region`: [batch, seq] mask of the tokens to count over; `unpadded`
        says (when known) that it is all True, which saves a check."""
        if region.dim() != 2:
            raise PositionError(f"positions need a [batch, seq] mask, got shape {tuple(region.shape)}")
        region = region.bool()
        B, T = region.shape
        dev = region.device
        if self.kind == "indices":
            idx = self.tensor.to(dev)
            if idx.dim() == 1:
                idx = idx.unsqueeze(0).expand(B, -1)
            if idx.dim() != 2 or idx.shape[0] != B:
                raise PositionError(
                    f"index positions have shape {tuple(self.tensor.shape)}; expected [batch={B}, K] or [K]"
                )
            if idx.numel() and (int(idx.max()) >= T or int(idx.min()) < -1):
                raise PositionError(
                    f"index positions must lie in 0..{T - 1} (or -1 for none) for a sequence of {T} tokens; "
                    f"got {int(idx.min())}..{int(idx.max())}"
                )
            return _finish(idx, idx >= 0)
        if self.kind == "mask":
            m = self.tensor.to(dev)
            if m.shape != region.shape:
                raise PositionError(f"position mask has shape {tuple(m.shape)} but the input is {tuple(region.shape)}")
            return _from_mask(m)
        if unpadded is None:
            unpadded = bool(region.all())
        if self.kind == "all":
            if unpadded:
                shared = torch.arange(T, device=dev)
                ones = torch.ones(B, T, dtype=torch.bool, device=dev)
                return Located(shared.expand(B, -1), ones, ones[:, 0], None, True, shared)
            return _from_mask(region)
        if self.kind == "first_last" and unpadded:
            return self._resolve_unpadded(B, T, dev)
        n = region.sum(1)  # real tokens per row
        start = torch.where(n > 0, region.int().argmax(1), torch.zeros_like(n))  # first real token
        if self.kind == "span":
            s = torch.as_tensor(self.start, device=dev).expand(B) if self.start is not None else torch.zeros_like(n)
            e = torch.as_tensor(self.end, device=dev).expand(B) if self.end is not None else n
            if bool((s < 0).any()) or (self.end is not None and bool((e < s).any())):
                raise PositionError(f"a span needs 0 <= start <= end; got start={self.start}, end={self.end}")
            e = torch.minimum(e, n)  # clamped to the real tokens, like first/last counts
            s = torch.minimum(s, e)  # a span that starts at or past a row's end selects nothing there
            K = int((e - s).max()) if B else 0
            ar = torch.arange(max(K, 1), device=dev)
            # slots past a row's span (all of them when it selects nothing) must still index inside the sequence
            idx = (start[:, None] + s[:, None] + ar).clamp(max=max(T - 1, 0))
            return _finish(idx, ar < (e - s)[:, None])
        if self.last:
            f = torch.clamp(torch.minimum(torch.full_like(n, self.first), (n + 1) // 2), min=0)
        else:
            f = torch.clamp(torch.full_like(n, self.first), max=n)
        l_ = torch.minimum(torch.full_like(n, self.last), n - f)
        parts, valids = [], []
        if self.first:
            ar = torch.arange(self.first, device=dev)
            parts.append(start[:, None] + ar)
            valids.append(ar < f[:, None])
        if self.last:
            ar = torch.arange(self.last, device=dev)
            parts.append(start[:, None] + n[:, None] - self.last + ar)
            valids.append(ar >= (self.last - l_)[:, None])
        return _finish(torch.cat(parts, 1), torch.cat(valids, 1))

    def _resolve_unpadded(self, B: int, T: int, dev) -> Located:
        """Fast path without padding: every row has the same T real tokens."""
        f = min(self.first, (T + 1) // 2) if self.last else min(self.first, T)
        l_ = min(self.last, T - f)
        K = self.first + self.last
        slots = list(range(f)) + [0] * (self.first - f) + [0] * (self.last - l_) + list(range(T - l_, T))
        shared = torch.tensor(slots, dtype=torch.long, device=dev)
        index = shared.expand(B, -1)
        if f + l_ == K:  # every slot is a distinct real token
            ones = torch.ones(B, K, dtype=torch.bool, device=dev)
            return Located(index, ones, ones[:, 0], None, True, shared)
        valid_row = [True] * f + [False] * (self.first - f) + [False] * (self.last - l_) + [True] * l_
        valid = torch.tensor(valid_row, device=dev).expand(B, -1)
        return _finish(index, valid)


def _pyvene_side(locs, what: str):
    if isinstance(locs, int):
        return Positions.indices([locs])
    if not isinstance(locs, (list, tuple)) or not all(isinstance(batch, (list, tuple)) for batch in locs):
        raise PositionError(f"pyvene {what} locations must be nested [intervention][batch][position] lists")
    out = []
    for k, batch in enumerate(locs):
        if any(isinstance(row, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in row) for row in batch):
            raise PositionError(
                f"pyvene {what} locations of intervention {k} are nested per head; put the head in the site "
                "(e.g. 'L3.H1.head_attention_value_output') and pass [batch][position] lists"
            )
        rows = [row if isinstance(row, (list, tuple)) else [row] for row in batch]
        out.append(Positions.indices(rows))
    return out


def _as_index_tensor(index) -> torch.Tensor:
    if isinstance(index, torch.Tensor):
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.dtype.is_complex:
            raise PositionError(f"index positions must be integers, got {index.dtype}")
        if index.dim() not in (1, 2):
            raise PositionError(f"index positions must be [K] or [batch, K], got shape {tuple(index.shape)}")
        return index.long()

    def as_int(v):
        if v is None:
            return -1
        if isinstance(v, bool) or not isinstance(v, int):
            raise PositionError(f"index positions must be integers, -1 or None; got {v!r}")
        return v

    rows = list(index)
    if rows and all(isinstance(r, (list, tuple)) for r in rows):
        K = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), max(K, 1)), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                out[i, : len(r)] = torch.tensor([as_int(v) for v in r], dtype=torch.long)
        return out
    if any(isinstance(r, (list, tuple)) for r in rows):
        raise PositionError("index positions mix lists and integers; use a list of ints or a list of lists")
    return torch.tensor([as_int(v) for v in rows], dtype=torch.long)


def _from_mask(m: torch.Tensor) -> Located:
    counts = m.sum(1)
    K = max(int(counts.max()) if m.shape[0] else 0, 1)
    order = torch.sort(m.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :K]
    return _finish(order, torch.arange(K, device=m.device) < counts[:, None])


def _finish(idx: torch.Tensor, valid: torch.Tensor) -> Located:
    row_valid = valid.any(1)
    first_valid = valid.int().argmax(1, keepdim=True)  # slot 0 for empty rows
    filler = idx.gather(1, first_valid).clamp(min=0)
    idx = torch.where(valid, idx, filler).clamp(min=0)
    canon = None
    all_rows = bool(valid.all())
    if not all_rows and not bool(valid[row_valid].all()):
        slots = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        canon = torch.where(valid, slots, first_valid.expand_as(idx))
    return Located(idx.long(), valid, row_valid, canon, all_rows)
