"""Naive references for the analysis tests: plain PyTorch forward hooks, one forward per site (not a test module)."""

from __future__ import annotations

import torch

from reftkit.sites import Site, resolve_site


def _get(output, index):
    return output[index] if isinstance(output, tuple) else output


def _put(output, index, value):
    return output[:index] + (value,) + output[index + 1:] if isinstance(output, tuple) else value


@torch.no_grad()
def record(model, input_ids, sites) -> tuple[dict, torch.Tensor]:
    """Activations `{site: [B, T, d]}` of one plain forward, and the last-token logits."""
    store, handles = {}, []
    for name in sites:
        rs = resolve_site(model, Site.parse(name))
        handles.append(rs.module.register_forward_hook(
            lambda mod, a, o, name=name, rs=rs: store.__setitem__(name, _get(o, rs.index).clone())))
    try:
        logits = model(input_ids=input_ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return store, logits


@torch.no_grad()
def patched_logits(model, input_ids, patches) -> torch.Tensor:
    """Last-token logits with `patches = [(site, position or None (all), value [B, T, d])]` written in."""
    handles = []
    for name, position, value in patches:
        rs = resolve_site(model, Site.parse(name))

        def hook(mod, a, o, rs=rs, position=position, value=value):
            x = _get(o, rs.index).clone()
            if position is None:
                x[:] = value
            else:
                x[:, position] = value[:, position]
            return _put(o, rs.index, x)

        handles.append(rs.module.register_forward_hook(hook))
    try:
        return model(input_ids=input_ids).logits[:, -1]
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def embedding_noise_hook(model, positions, noise):
    """Register a hook adding `noise [B, K, d]` to the embedding output at `positions`; returns the handle."""
    def hook(mod, a, o):
        o = o.clone()
        o[:, positions] = o[:, positions] + noise.to(o.dtype)
        return o

    return model.get_input_embeddings().register_forward_hook(hook)
