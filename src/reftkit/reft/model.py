"""`ReftModel`: a frozen base model plus named ReFT adapters, with the PEFT lifecycle users already know.

Design decisions:
- All adapters live in ONE `IntervenableModel` (one hook per site, whatever the adapter count). Which adapter
  edits which example is a per-example routing mask, so a batch can mix adapters (serving) and switching the
  active adapter costs nothing.
- Positions are counted over the prompt (`prompt_mask` from the collator, else the attention mask), so left and
  right padding give the same edits and users never build index lists by hand.
- With labels, the LM head and the loss are computed only at label positions (`logits_to_keep` as a boolean
  mask): on a 49k vocabulary that is most of the head's cost.
- `train()` / `eval()` reach the interventions (they are submodules), so dropout follows the mode.
- Saving writes `adapter_config.json` + `adapter_model.safetensors` (a few hundred KB); loading builds
  interventions from registry names and refuses a model they do not fit.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import __version__
from ..atomic import write_folder
from ..engine import Binding, IntervenableModel
from ..errors import ConfigError, IncompatibleModelError, MissingDependencyError, ReftkitError
from ..interventions import build_intervention
from ..sites import Site, model_dims, resolve_site
from .config import ReftConfig

log = logging.getLogger(__name__)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def get_reft_model(model: nn.Module, config: ReftConfig, adapter_name: str = "default") -> "ReftModel":
    """Freeze `model` and attach a fresh ReFT adapter described by `config`."""
    return ReftModel(model, config, adapter_name)


class ReftModel(nn.Module):
    def __init__(self, model: nn.Module, config: ReftConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.configs: dict[str, ReftConfig] = {}
        self.adapters = nn.ModuleDict()
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._enabled = True
        self._engine: IntervenableModel | None = None
        self._binding_adapter: list[str] = []
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if config is not None:
            self.add_adapter(adapter_name, config)

    # ---- adapters ---------------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: ReftConfig, *, activate: bool = True) -> None:
        if name in self.configs:
            raise ConfigError(f"an adapter named {name!r} exists already; adapters: {list(self.configs)}")
        if "/" in name or "." in name or not name:
            raise ConfigError(f"adapter names cannot be empty or contain '/' or '.', got {name!r}")
        dims = model_dims(self.model)
        layers = config.resolve_layers(dims.n_layers)
        ivs = nn.ModuleList()
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(config.seed)
            for layer in layers:
                width = resolve_site(self.model, Site(layer=layer, component=config.component)).width
                for _suffix, _pos in config.split_positions():
                    ivs.append(build_intervention({"type": config.method, "config": _intervention_config(config, width)}))
        device = next(self.model.parameters()).device
        self.adapters[name] = ivs.to(device)
        self.configs[name] = config
        for mod_name in config.extra.get("modules_to_save", []):
            self._add_module_to_save(mod_name)
        if activate or self.active_adapter is None:
            self.active_adapter = name
        self._rebuild()

    def _add_module_to_save(self, path: str) -> None:
        mod = self.model.get_submodule(path)
        for p in mod.parameters():
            p.requires_grad_(True)
        self.modules_to_save[path.replace(".", "__")] = mod

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        del self.adapters[name]
        del self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.configs), None)
        self._rebuild()

    def set_adapter(self, name: str) -> None:
        self._require(name)
        self.active_adapter = name

    def enable_adapters(self) -> None:
        self._enabled = True

    def disable_adapters(self) -> None:
        self._enabled = False

    @contextmanager
    def disable_adapter(self):
        """Inside this block the base model runs untouched (used for DPO's reference model)."""
        saved, self._enabled = self._enabled, False
        try:
            yield self
        finally:
            self._enabled = saved

    def _require(self, name: str) -> None:
        if name not in self.configs:
            raise ConfigError(f"no adapter named {name!r}; adapters: {list(self.configs)}")

    def _rebuild(self) -> None:
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
        bindings, owners = [], []
        for name, config in self.configs.items():
            layers = config.resolve_layers(model_dims(self.model).n_layers)
            ivs = iter(self.adapters[name])
            for layer in layers:
                for suffix, pos in config.split_positions():
                    tag = f"{name}/L{layer}" + (f".{suffix}" if suffix else "")
                    bindings.append(Binding(Site(layer=layer, component=config.component), next(ivs), tag, pos))
                    owners.append(name)
        self._binding_adapter = owners
        if bindings:
            # the engine is not a registered submodule: the adapters own the parameters
            object.__setattr__(self, "_engine", IntervenableModel(self.model, bindings))

    def unload(self) -> nn.Module:
        """Remove every hook this object installed and return the untouched base model."""
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
        return self.model

    # ---- routing ----------------------------------------------------------------------------------------
    def _active(self, batch: int, adapter_names, device) -> torch.Tensor:
        """bool [batch, bindings]: which binding edits which example."""
        n = len(self._binding_adapter)
        if not self._enabled:
            return torch.zeros(batch, n, dtype=torch.bool, device=device)
        if adapter_names is None:
            adapter_names = self.active_adapter
        if isinstance(adapter_names, str) or adapter_names is None:
            adapter_names = [adapter_names] * batch
        if len(adapter_names) != batch:
            raise ReftkitError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch}")
        for a in set(adapter_names):
            if a is not None:
                self._require(a)
        owners = self._binding_adapter
        rows = [[owner == a for owner in owners] for a in adapter_names]
        return torch.tensor(rows, dtype=torch.bool, device=device).reshape(batch, n)

    # ---- forward / generate -----------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, prompt_mask=None, adapter_names=None,
                **kwargs):
        if self._engine is None:
            raise ReftkitError("this ReftModel has no adapter; add one with add_adapter(name, ReftConfig(...))")
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        active = self._active(ref.shape[0], adapter_names, ref.device)
        region = prompt_mask if prompt_mask is not None else attention_mask
        causal_labels = labels is not None and self._keep_logits and labels.dim() == 2
        if causal_labels:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100
            kwargs["logits_to_keep"] = keep
        elif labels is not None:
            kwargs["labels"] = labels
        out = self._engine.run({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs},
                               active=active, region_mask=region).output
        if causal_labels:
            logits = out.logits.float()
            target = labels[:, 1:][keep[:, :-1]]
            out.loss = F.cross_entropy(logits, target) if target.numel() else logits.sum() * 0.0
        return out

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, adapter_names=None, **generate_kwargs):
        """Generate with the active adapter, or one adapter per example (`adapter_names=[...]`, None = base).
        Positions are resolved on each prompt's real tokens; edits on the prompt are baked into the KV cache."""
        if self._engine is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        active = self._active(input_ids.shape[0], adapter_names, input_ids.device)
        return self._engine.generate(input_ids, attention_mask, active=active, **generate_kwargs)

    # ---- parameters -------------------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.adapters.parameters() if p.requires_grad)
        trainable += sum(p.numel() for p in self.modules_to_save.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters()) + sum(p.numel() for p in self.adapters.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> str:
        """Writes (and returns) the PEFT-style summary line; called explicitly by the user."""
        t, n = self.trainable_parameters()
        line = f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / n:.4f}"
        sys.stdout.write(line + "\n")
        return line

    # ---- save / load ------------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        self._require(name)
        state = {}
        with torch.no_grad():
            for i, iv in enumerate(self.adapters[name]):
                for k, v in iv.state_dict().items():
                    state[f"interventions.{i}.{k}"] = v.detach().contiguous().cpu()
            for key, mod in self.modules_to_save.items():
                for k, v in mod.state_dict().items():
                    state[f"modules.{key}.{k}"] = v.detach().contiguous().cpu()
        return state

    def save_pretrained(self, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """Write each adapter (or one) as `adapter_config.json` + `adapter_model.safetensors`; the default
        adapter goes in `directory`, others in `directory/<name>/`. Writes are atomic."""
        directory = Path(directory)
        names = [adapter_name] if adapter_name else list(self.configs)
        for name in names:
            target = directory if name == "default" or len(names) == 1 else directory / name
            meta = {"reftkit_version": __version__, "adapter_name": name, "config": self.configs[name].to_dict(),
                    "model": _fingerprint(self.model)}
            write_folder(target, {CONFIG_NAME: json.dumps(meta, indent=2)}, {WEIGHTS_NAME: self.adapter_state_dict(name)})
        return directory

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False) -> "ReftModel":
        """Load an adapter saved by `save_pretrained` (or a pyreft 0.1.0 folder) onto `model`."""
        reft = cls(model)
        reft.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        return reft

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", *,
                     is_trainable: bool = False) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            if (directory / "config.json").is_file() and any(directory.glob("intkey_*.bin")):
                self._load_pyreft(directory, adapter_name)
                return
            raise ConfigError(f"{directory} holds no {CONFIG_NAME}; save adapters with save_pretrained()")
        try:
            meta = json.loads((directory / CONFIG_NAME).read_text())
            config = ReftConfig.from_dict(meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{directory / CONFIG_NAME} is not a valid adapter config: {e}") from e
        _check_fingerprint(meta.get("model", {}), self.model, directory)
        self.add_adapter(adapter_name, config)
        state = load_file(str(directory / WEIGHTS_NAME))
        self._load_state(adapter_name, state, directory)
        if not is_trainable:
            for p in self.adapters[adapter_name].parameters():
                p.requires_grad_(False)

    def _load_state(self, name: str, state: dict, where) -> None:
        ivs = self.adapters[name]
        for i, iv in enumerate(ivs):
            prefix = f"interventions.{i}."
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                iv.load_state_dict(part, strict=True)
            except RuntimeError as e:
                raise IncompatibleModelError(f"adapter weights in {where} do not fit intervention {i}: {e}") from e
        for key, mod in self.modules_to_save.items():
            prefix = f"modules.{key}."
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                mod.load_state_dict(part, strict=True)

    def _load_pyreft(self, directory: Path, adapter_name: str) -> None:
        from ..io_pyreft import read_pyreft_folder

        entries = read_pyreft_folder(directory)
        if not entries:
            raise ConfigError(f"{directory}: the pyreft folder has no interventions")
        layers = [e[0] for e in entries]
        _, component, type_name, cfg, _ = entries[0]
        config = ReftConfig(method=type_name, layers=layers, component=component,
                            rank=int(cfg.get("low_rank_dimension", 1)), positions="all",
                            dropout_on="output", extra={})
        self.add_adapter(adapter_name, config)
        for iv, (_, _, _, _, state) in zip(self.adapters[adapter_name], entries):
            iv.load_state_dict(state, strict=True)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the adapters to the Hugging Face Hub (needs `huggingface_hub` and network access)."""
        try:
            from huggingface_hub import HfApi
        except ImportError as e:
            raise MissingDependencyError("push_to_hub needs huggingface_hub: pip install 'reftkit[hub]'") from e
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True, **{k: v for k, v in kwargs.items() if k in ("private", "token")})
            api.upload_folder(repo_id=repo_id, folder_path=tmp)
        return repo_id


def _intervention_config(config: ReftConfig, width: int) -> dict:
    """The intervention config for one site: the ReFT fields its config class has, plus `extra`."""
    import dataclasses

    from ..interventions import REGISTRY

    names = {f.name for f in dataclasses.fields(REGISTRY[config.method].config_class)}
    cfg = {"embed_dim": width, "low_rank_dimension": config.rank, "dropout": config.dropout,
           "dropout_on": config.dropout_on, "act_fn": config.act_fn}
    cfg = {k: v for k, v in cfg.items() if k in names and (k != "act_fn" or v is not None)}
    cfg.update({k: v for k, v in config.extra.items() if k != "modules_to_save"})
    return cfg


def _fingerprint(model: nn.Module) -> dict:
    d = model_dims(model)
    return {"model_type": d.model_type, "hidden_size": d.hidden, "num_layers": d.n_layers}


def _check_fingerprint(saved: dict, model: nn.Module, where) -> None:
    now = _fingerprint(model)
    for key in ("hidden_size", "num_layers"):
        if key in saved and saved[key] != now[key]:
            raise IncompatibleModelError(
                f"the adapter in {where} was trained on a model with {key}={saved[key]}, but this model has "
                f"{key}={now[key]}; load it onto the model it was trained for"
            )
    if saved.get("model_type") and saved["model_type"] != now["model_type"]:
        raise IncompatibleModelError(
            f"the adapter in {where} was trained on a {saved['model_type']} model, not on this "
            f"{now['model_type']} model; load it onto the architecture it was trained for"
        )
