"""Architecture knowledge: where each canonical component lives inside one transformer block.

Resolution is structural, not by model class: the block list is found as the `nn.ModuleList` whose length is the
model's layer count, and inside a block each component is found by trying a short list of child names that the
families use (`self_attn` / `attn` / `attention`, `o_proj` / `c_proj` / `dense`, ...). A small per-family table
(keyed by `config.model_type`) covers the few layouts that names alone cannot describe: fused query/key/value
projections and encoder blocks whose MLP is split over two modules. Subclasses, PEFT wrappers and compiled
models therefore resolve like the model they wrap.

A `Layout` entry is `(relative module path candidates, "input" | "output", tuple index)`; the fused-QKV layouts
say how a query/key/value slice is cut out of the fused projection's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Component -> candidate paths relative to the block, the hook side, and which tuple element carries the tensor.
ATTENTION = ("self_attn", "attn", "attention", "self_attention")
MLP = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
ATTN_OUT_PROJ = ("o_proj", "out_proj", "c_proj", "dense", "output.dense")
MLP_DOWN_PROJ = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")
Q_PROJ = ("q_proj", "query", "self.query")
K_PROJ = ("k_proj", "key", "self.key")
V_PROJ = ("v_proj", "value", "self.value")

CANONICAL_COMPONENTS = (
    "embedding",
    "block_input",
    "block_output",
    "attention_input",
    "attention_output",
    "attention_value_output",
    "query_output",
    "key_output",
    "value_output",
    "head_attention_value_output",
    "head_query_output",
    "head_key_output",
    "head_value_output",
    "mlp_input",
    "mlp_output",
    "mlp_activation",
    "moe_router",
    "moe_experts_output",
)
HEAD_COMPONENTS = {
    "head_attention_value_output": "attention_value_output",
    "head_query_output": "query_output",
    "head_key_output": "key_output",
    "head_value_output": "value_output",
}


@dataclass(frozen=True)
class FusedQKV:
    """A fused projection: `layout` is "blocked" ([q | k | v], each full width, e.g. GPT-2's `c_attn`) or
    "per_head" (`[h0: q k v][h1: q k v]...`, e.g. GPT-NeoX's `query_key_value`)."""

    path: str
    layout: str


@dataclass(frozen=True)
class Family:
    """Per-family overrides; any component not named here is resolved from the candidate lists above."""

    paths: dict = field(default_factory=dict)  # component -> (path, side, tuple_index)
    fused_qkv: FusedQKV | None = None


_BERT_LIKE = Family(
    paths={
        "attention_input": ("attention", "input", 0),
        "attention_output": ("attention.output.dense", "output", 0),
        "attention_value_output": ("attention.output.dense", "input", 0),
        "query_output": ("attention.self.query", "output", 0),
        "key_output": ("attention.self.key", "output", 0),
        "value_output": ("attention.self.value", "output", 0),
        "mlp_input": ("intermediate", "input", 0),
        "mlp_activation": ("output.dense", "input", 0),
        "mlp_output": ("output.dense", "output", 0),
    }
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(fused_qkv=FusedQKV("attn.c_attn", "blocked")),
    "gpt_neox": Family(fused_qkv=FusedQKV("attention.query_key_value", "per_head")),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
}


def family_of(model_type: str | None) -> Family:
    return FAMILIES.get(model_type or "", Family())
