"""Make the pyvene golden fixtures in tests/fixtures/pyvene.

Runs in a virtualenv with pyvene 0.1.8 (and scikit-learn for the PCA basis), never with reftkit:

    /tmp/venv-anchor/bin/python tools/make_pyvene_fixtures.py [--out tests/fixtures/pyvene]

For every pyvene intervention that reftkit also has, it builds the intervention with seeded weights, runs its
`forward` on seeded `base`/`source` of shape [3, 4, 16] in a few cases (interchange_dim, uniform and per-example
subspaces, a subspace partition, temperatures), and writes `<name>.safetensors` holding

    base, source                 the inputs (the same for every file)
    state.<key>                  pyvene's state dict, before any case ran
    computed.rotate_layer.weight the orthonormal matrix of a parametrized rotation
    vector, fit.activations      a constant source / the activations the PCA basis was fitted on
    out.<case>                   pyvene's output

and `<name>.json` with pyvene's constructor arguments and, per case, the pyvene call and the equivalent reftkit
call (`config` overrides, `subspaces`, boundary / temperature settings).

Calls avoid pyvene paths that do not compute what they mean to: per-example subspaces that can be cast to a
rectangular tensor but differ between examples (the index broadcast mixes positions with examples), per-example
subspaces in LowRankRotatedSpaceIntervention (indexes positions), and [batch, K, d] inputs to the boundless and
sigmoid-mask rotated types (their [batch, d] mask only broadcasts when K == batch); those two run on [batch * K, d],
which is the same computation per vector. NoiseIntervention is left out: it adds a fixed numpy draw of shape
(1, 4, d) in place, which reftkit's seeded per-call `noise` does not try to reproduce.
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pyvene import (
    AdditionIntervention, AutoencoderIntervention, BoundlessRotatedSpaceIntervention, CollectIntervention,
    JumpReLUAutoencoderIntervention, LowRankRotatedSpaceIntervention, PCARotatedSpaceIntervention,
    RotatedSpaceIntervention, SigmoidMaskIntervention, SigmoidMaskRotatedSpaceIntervention, SkipIntervention,
    SubtractionIntervention, VanillaIntervention, ZeroIntervention,
)

B, K, D = 3, 4, 16
UNIFORM = [[1, 3, 8]] * B
RAGGED = [[0, 1], [5], [2, 9, 15]]


def case(name, interchange_dim=None, subspaces=None, layout="bkd", reftkit=None, **settings):
    """One call: how pyvene is called and the equivalent reftkit call (default: the same arguments)."""
    pv = {"interchange_dim": interchange_dim, "subspaces": subspaces, "layout": layout, **settings}
    rk = reftkit if reftkit is not None else {
        "config": {} if interchange_dim is None else {"interchange_dim": interchange_dim},
        "subspaces": subspaces, **settings,
    }
    return {"name": name, "pyvene": pv, "reftkit": rk}


SUBSPACE_CASES = [case("all"), case("first5", 5), case("uniform", subspaces=UNIFORM),
                  case("ragged", subspaces=RAGGED)]


def inputs():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(B, K, D, generator=g), torch.randn(B, K, D, generator=g)


def apply_settings(iv, settings):
    if settings.get("interchange_dim") is not None:
        iv.set_interchange_dim(settings["interchange_dim"])
    if settings.get("boundary") is not None:
        iv.set_intervention_boundaries(settings["boundary"])
    if settings.get("temperature") is not None:
        iv.set_temperature(torch.tensor(float(settings["temperature"])))


def run_case(make, base, source, pv, constant_source):
    iv = make()
    apply_settings(iv, pv)
    b, s = base.clone(), None if constant_source else source.clone()
    if pv["layout"] == "flat":
        b, s = b.reshape(B * K, D), s.reshape(B * K, D)
    with torch.no_grad():
        out = iv(b, s, subspaces=pv["subspaces"])
    return out.reshape(B, K, -1).detach().clone().contiguous()


def fixture(out_dir, name, reftkit_type, pyvene_cls, kwargs, cases, init=None, extra=None,
            reftkit_config=None, constant_source=False, json_kwargs=None):
    """Build one seeded pyvene intervention, run every case on a fresh copy of its weights, save."""
    base, source = inputs()
    torch.manual_seed(sum(map(ord, name)))
    template = pyvene_cls(**kwargs)
    if init is not None:
        with torch.no_grad():
            init(template)
    state = {k: v.detach().clone() for k, v in template.state_dict().items()}

    def make():
        iv = pyvene_cls(**kwargs)
        iv.load_state_dict(state)
        return iv

    tensors = {"base": base, "source": source}
    tensors.update({f"state.{k}": v.contiguous() for k, v in state.items()})
    if hasattr(template, "rotate_layer"):
        tensors["computed.rotate_layer.weight"] = template.rotate_layer.weight.detach().clone().contiguous()
    tensors.update(extra or {})
    for c in cases:
        tensors[f"out.{c['name']}"] = run_case(make, base, source, c["pyvene"], constant_source)
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / f"{name}.safetensors"))
    meta = {
        "pyvene_version": metadata.version("pyvene"),
        "torch_version": torch.__version__,
        "pyvene_class": pyvene_cls.__name__,
        "pyvene_kwargs": json_kwargs if json_kwargs is not None else kwargs,
        "reftkit_type": reftkit_type,
        "reftkit_config": reftkit_config or {},
        "constant_source": constant_source,
        "cases": cases,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")


def basic(out_dir):
    for name, cls in (("replace", VanillaIntervention), ("add", AdditionIntervention),
                      ("subtract", SubtractionIntervention), ("skip", SkipIntervention)):
        fixture(out_dir, name, name, cls, {"embed_dim": D}, SUBSPACE_CASES, reftkit_config={"embed_dim": D})
    fixture(out_dir, "zero", "zero", ZeroIntervention, {"embed_dim": D}, SUBSPACE_CASES,
            reftkit_config={"embed_dim": D})
    fixture(out_dir, "collect", "collect", CollectIntervention, {"embed_dim": D}, [case("all")],
            reftkit_config={"embed_dim": D}, constant_source=True)
    vector = torch.randn(D, generator=torch.Generator().manual_seed(7))
    for name, cls in (("add_vector", AdditionIntervention), ("subtract_vector", SubtractionIntervention)):
        fixture(out_dir, name, name.split("_")[0], cls, {"embed_dim": D, "source_representation": vector},
                [case("all"), case("first5", 5), case("uniform", subspaces=UNIFORM)], extra={"vector": vector},
                reftkit_config={"embed_dim": D}, constant_source=True, json_kwargs={"embed_dim": D})


def rotated(out_dir):
    cfg = {"embed_dim": D}
    fixture(out_dir, "rotated", "rotated", RotatedSpaceIntervention, cfg,
            [case("all"), case("first6", 6), case("uniform", subspaces=UNIFORM), case("ragged", subspaces=RAGGED)],
            reftkit_config=cfg)
    part = [[0, 4], [4, 10], [10, 16]]
    cfg = {"embed_dim": D, "subspace_partition": part}
    fixture(out_dir, "rotated_partition", "rotated", RotatedSpaceIntervention, cfg,
            [case("uniform", subspaces=[[0, 2]] * B), case("ragged", subspaces=[[0], [1, 2], [2]])],
            reftkit_config=cfg)
    cfg = {"embed_dim": D, "low_rank_dimension": 4}
    fixture(out_dir, "low_rank_rotated", "low_rank_rotated", LowRankRotatedSpaceIntervention, cfg,
            [case("all"), case("uniform", subspaces=[[0, 2]] * B)], reftkit_config=cfg)
    cfg = {"embed_dim": D, "low_rank_dimension": 4, "subspace_partition": [[0, 1], [1, 4]]}
    fixture(out_dir, "low_rank_rotated_partition", "low_rank_rotated", LowRankRotatedSpaceIntervention, cfg,
            [case("uniform", subspaces=[[1]] * B)], reftkit_config=cfg)


def soft_masks(out_dir):
    cfg = {"embed_dim": D}
    fixture(out_dir, "boundless_rotated", "boundless_rotated", BoundlessRotatedSpaceIntervention, cfg,
            [case("default", layout="flat"), case("sharp", layout="flat", boundary=0.37, temperature=0.5),
             case("wide", layout="flat", boundary=0.9, temperature=0.05)], reftkit_config=cfg)

    def random_masks(iv):
        iv.masks.copy_(torch.randn(D) * 3.0)

    fixture(out_dir, "sigmoid_mask_rotated", "sigmoid_mask_rotated", SigmoidMaskRotatedSpaceIntervention, cfg,
            [case("default", layout="flat"), case("warm", layout="flat", temperature=0.7)], init=random_masks,
            reftkit_config=cfg)

    def random_mask(iv):
        iv.mask.copy_(torch.randn(D) * 2.0)

    fixture(out_dir, "sigmoid_mask", "sigmoid_mask", SigmoidMaskIntervention, cfg,
            [case("default"), case("warm", temperature=1.5)], init=random_mask, reftkit_config=cfg)


def pca(out_dir):
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(99)
    mixing = torch.randn(D, D, generator=g) * torch.linspace(3.0, 0.2, D).unsqueeze(1)
    acts = (torch.randn(64, D, generator=g) @ mixing + torch.randn(D, generator=g)).numpy().astype(np.float64)
    mean, std = acts.mean(0), acts.std(0)
    fitted = PCA(n_components=6).fit((acts - mean) / std)
    kwargs = {"embed_dim": D, "pca": fitted, "pca_mean": mean, "pca_std": std}
    fixture(out_dir, "pca_rotated", "pca_rotated", PCARotatedSpaceIntervention, kwargs,
            [case("all"), case("first3", 3), case("uniform", subspaces=[[0, 4]] * B)],
            extra={"fit.activations": torch.from_numpy(acts).float()},
            reftkit_config={"embed_dim": D, "n_components": 6},
            json_kwargs={"embed_dim": D, "pca": "sklearn PCA(n_components=6) of the standardised fit.activations",
                         "pca_mean": "fit.activations mean", "pca_std": "fit.activations std (ddof=0)"})


def sae(out_dir):
    latents = [1, 5, 20, 31]
    fixture(out_dir, "autoencoder", "autoencoder", AutoencoderIntervention, {"embed_dim": D, "latent_dim": 32},
            [case("default", reftkit={"config": {}, "subspaces": [D]}),
             case("indices", interchange_dim=latents, reftkit={"config": {}, "subspaces": latents})],
            reftkit_config={"embed_dim": D, "latent_dim": 32})

    def gemma_scope_like(iv):
        iv.W_enc.copy_(torch.randn(D, 32) * 0.3)
        iv.b_enc.copy_(torch.randn(32) * 0.1)
        iv.threshold.copy_(torch.rand(32) * 0.3)
        iv.W_dec.copy_(torch.randn(32, D) * 0.3)
        iv.b_dec.copy_(torch.randn(D) * 0.1)

    fixture(out_dir, "jumprelu_sae", "jumprelu_sae", JumpReLUAutoencoderIntervention,
            {"embed_dim": D, "low_rank_dimension": 32},
            [case("default", reftkit={"config": {"interchange_dim": D}, "subspaces": None}), case("first7", 7),
             case("uniform", subspaces=[[3, 17, 30]] * B), case("ragged", subspaces=[[0, 1], [5], [2, 9, 31]])],
            init=gemma_scope_like, reftkit_config={"embed_dim": D, "latent_dim": 32})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pyvene"))
    out_dir = Path(parser.parse_args().out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for make in (basic, rotated, soft_masks, pca, sae):
        make(out_dir)
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {len(list(out_dir.iterdir()))} files, {total / 1024:.1f} KiB, to {out_dir}")


if __name__ == "__main__":
    main()
