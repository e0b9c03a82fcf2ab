"""Golden fixtures from pyreft 0.1.0 (pyvene 0.1.8, transformers 4.45.1), for the ReFT parity tests.

Run inside a virtualenv that has those versions (not reftkit's):

    python -m venv /tmp/venv-anchor
    /tmp/venv-anchor/bin/pip install torch==2.13.0 && /tmp/venv-anchor/bin/pip install pyreft==0.1.0
    /tmp/venv-anchor/bin/python tools/make_pyreft_fixtures.py [--out tests/fixtures/pyreft]

Writes, under the output folder:
- `<type>.safetensors` + `<type>.json` for every pyreft ReFT intervention (named by reftkit's registry name):
  the seeded base input `[3, 4, 16]`, the weights (raw parametrization tensors and the computed rotation
  `[d, r]`), the outputs in eval mode, in train mode with dropout 0 and in train mode with dropout 0.3 drawn
  after `torch.manual_seed(DROPOUT_SEED)`, and the gradients of a fixed scalar loss with respect to the input,
  each parameter and the computed rotation. The JSON holds the constructor arguments and the loss.
- `tiny_llama/`: a seeded 4-layer Llama (`save_pretrained`, safetensors, float32). The vocabulary is 128 tokens
  to keep the file small (about 650 KB, nearly all of it the four layers).
- `saved_adapter/`: pyreft's own save (`config.json` + `intkey_*.bin`) of LoReFT rank 4 on `block_output` of
  layers 1 and 3, with random weights; pyreft's reload is checked against it.
- `saved_adapter_mixed/`: the five other pyreft types, one site each (one on `mlp_output`).
- `<folder>_logits.safetensors`: the batch (input_ids, attention_mask, positions [B, K] shared by every site),
  the model's logits without interventions and pyreft's logits with them.

Every draw is seeded, so running the script twice writes identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.nn.utils import parametrize

EMBED_DIM, RANK, SHAPE = 16, 4, (3, 4, 16)
DROPOUT, DROPOUT_SEED = 0.3, 1234
LOSS = "sum(output * loss_weight) + 0.5 * sum(output ** 2)"

# reftkit registry name -> (pyreft class name, extra constructor arguments)
CASES = {
    "loreft": ("LoreftIntervention", {}),
    "loreft_gelu": ("LoreftIntervention", {"act_fn": "gelu"}),
    "direft": ("NodireftIntervention", {"add_bias": True}),
    "orthogonal_direft": ("DireftIntervention", {}),
    "noreft": ("NoreftIntervention", {"add_bias": True}),
    "consreft": ("ConsreftIntervention", {}),
    "lobireft": ("LobireftIntervention", {}),
}


def _loss(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (out * weight).sum() + 0.5 * (out**2).sum()


def _randomise(iv: torch.nn.Module, gen: torch.Generator) -> None:
    """Move every parameter away from its initial value. For a rotation only the strictly lower triangle of the
    raw Householder parameter is perturbed (the reflectors), so the computed matrix is not simply the first
    columns of the trivialization's base: torch reads the diagonal through `.int()` as signs, and any other value
    there breaks orthonormality."""
    with torch.no_grad():
        for name, p in iv.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("original"):
                p.add_(0.3 * noise.tril(-1))
            else:
                p.add_(0.5 * noise)


def intervention_case(name: str, out_dir: str, seed: int) -> None:
    import pyreft

    cls_name, extra = CASES[name]
    kwargs = {"embed_dim": EMBED_DIM, "low_rank_dimension": RANK, "dropout": 0.0, **extra}
    torch.manual_seed(seed)
    iv = getattr(pyreft, cls_name)(**kwargs, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    _randomise(iv, gen)
    base = torch.randn(SHAPE, generator=gen)
    loss_weight = torch.randn(SHAPE, generator=gen)
    has_rotation = hasattr(iv, "rotate_layer")

    tensors = {"input": base, "loss_weight": loss_weight}
    for pname, p in iv.named_parameters():
        tensors[f"param.{pname}"] = p.detach().clone()
    if has_rotation:
        tensors["rotation"] = iv.rotate_layer.weight.detach().clone()
        tensors["param.rotate_layer.parametrizations.weight.0.base"] = (
            iv.rotate_layer.parametrizations.weight[0].base.detach().clone()
        )

    with torch.no_grad():
        iv.eval()
        tensors["output_eval"] = iv(base.clone()).detach()
        iv.train()
        tensors["output_train"] = iv(base.clone()).detach()

    # gradients, in train mode with dropout 0; the computed rotation is cached so its gradient can be read
    x = base.clone().requires_grad_(True)
    iv.zero_grad()
    with parametrize.cached():
        rotation = iv.rotate_layer.weight if has_rotation else None
        if rotation is not None:
            rotation.retain_grad()
        out = iv(x)
        loss = _loss(out, loss_weight)
        loss.backward()
    tensors["loss"] = loss.detach().reshape(1)
    tensors["grad.input"] = x.grad.detach().clone()
    for pname, p in iv.named_parameters():
        if p.grad is not None:  # NodireftIntervention never uses its proj_layer.bias
            tensors[f"grad.{pname}"] = p.grad.detach().clone()
    if rotation is not None:
        tensors["grad.rotation"] = rotation.grad.detach().clone()

    has_dropout = hasattr(iv, "dropout")
    if has_dropout:
        iv.dropout.p = DROPOUT
        iv.train()
        torch.manual_seed(DROPOUT_SEED)
        with torch.no_grad():
            tensors["output_train_dropout"] = iv(base.clone()).detach()

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out_dir, f"{name}.safetensors"))
    meta = {
        "pyreft_class": cls_name,
        "kwargs": kwargs,
        "dtype": "float32",
        "loss": LOSS,
        "dropout_output": ({"p": DROPOUT, "seed": DROPOUT_SEED, "dropout_on": "output"} if has_dropout else None),
        "versions": _versions(),
    }
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def _versions() -> dict:
    import pyreft  # noqa: F401
    import pyvene
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "pyvene": getattr(pyvene, "__version__", "0.1.8"), "pyreft": "0.1.0"}


def tiny_llama(out_dir: str) -> None:
    """Build and save the seeded tiny Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(os.path.join(out_dir, "tiny_llama"), safe_serialization=True)


def tiny_llama_inputs(vocab_size: int) -> tuple[dict, torch.Tensor]:
    """The fixed batch (row 1 right-padded by two tokens) and the positions `[B, K]` (last real token, first
    token) shared by every intervention."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (2, 7), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}, torch.tensor([[6, 0], [4, 0]])


def adapter_case(out_dir: str, name: str, sites: list[tuple[int, str, str, dict]], seed: int,
                 check_reload: bool) -> None:
    """Attach pyreft interventions at `sites` (layer, component, class name, extra kwargs), randomise them,
    record pyreft's logits and save the folder with `ReftModel.save`."""
    import pyreft
    from transformers import LlamaForCausalLM

    model_dir = os.path.join(out_dir, "tiny_llama")
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    batch, positions = tiny_llama_inputs(model.config.vocab_size)
    with torch.no_grad():
        base_logits = model(**batch).logits
    hidden = model.config.hidden_size
    torch.manual_seed(seed)
    reft_config = pyreft.ReftConfig(representations=[{
        "layer": layer, "component": component, "low_rank_dimension": RANK,
        "intervention": getattr(pyreft, cls_name)(embed_dim=hidden, low_rank_dimension=RANK, dtype=torch.float32,
                                                  **extra),
    } for layer, component, cls_name, extra in sites])
    reft_model = pyreft.get_reft_model(model, reft_config)
    wgen = torch.Generator().manual_seed(seed + 1)
    for iv in reft_model.interventions.values():
        _randomise(iv, wgen)
        iv.eval()  # pyvene's eval() only reaches the wrapped model
    reft_model.eval()

    locations = {"sources->base": (None, [positions.tolist() for _ in sites])}
    with torch.no_grad():
        _, out = reft_model(batch, unit_locations=locations)
    logits = out.logits
    if (logits - base_logits).abs().max() < 1e-2:
        raise SystemExit(f"{name}: the interventions barely change the logits; the fixture would test nothing")
    adapter_dir = os.path.join(out_dir, name)
    reft_model.save(adapter_dir)

    if check_reload:
        # pyreft's own round trip must give the same logits, or the saved folder is not what pyreft means
        loaded = pyreft.ReftModel.load(adapter_dir, LlamaForCausalLM.from_pretrained(model_dir).eval())
        for key, iv in loaded.interventions.items():
            # pyvene rebuilds LoReFT without `dtype`: its learned source is bfloat16 and the loaded weights are
            # rounded; load them again into a float32 source
            iv.learned_source.float()
            iv.load_state_dict(torch.load(os.path.join(adapter_dir, f"intkey_{key}.bin"), weights_only=True))
            iv.eval()
        with torch.no_grad():
            _, again = loaded(batch, unit_locations=locations)
        err = (again.logits - logits).abs().max().item()
        if err > 1e-5:
            raise SystemExit(f"{name}: pyreft's reload differs from the saved model by {err}")

    save_file({**batch, "positions": positions, "base_logits": base_logits.contiguous(),
               "logits": logits.contiguous()}, os.path.join(out_dir, f"{name}_logits.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "pyreft"))
    args = parser.parse_args(argv)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    for i, name in enumerate(CASES):
        intervention_case(name, out_dir, seed=100 + i)
    tiny_llama(out_dir)
    adapter_case(out_dir, "saved_adapter", [(1, "block_output", "LoreftIntervention", {}),
                                            (3, "block_output", "LoreftIntervention", {})], seed=2, check_reload=True)
    # every other pyreft type; pyreft itself cannot reload NoReFT / NodiReFT folders (it needs `add_bias`)
    adapter_case(out_dir, "saved_adapter_mixed", [
        (0, "block_output", "NoreftIntervention", {"add_bias": True}),
        (1, "block_output", "ConsreftIntervention", {}),
        (2, "mlp_output", "NodireftIntervention", {"add_bias": False}),
        (2, "block_output", "LobireftIntervention", {}),
        (3, "block_output", "DireftIntervention", {}),
    ], seed=4, check_reload=False)
    sys.stdout.write(f"wrote pyreft fixtures to {out_dir}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
