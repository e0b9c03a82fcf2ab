"""`ReftModel`: a frozen base model plus named ReFT adapters, with the PEFT lifecycle users already know.

Design decisions:
- All adapters live in ONE `IntervenableModel` (one hook per site, whatever the adapter count). Which adapter
  edits which example is a per-example routing mask, so a batch can mix adapters (serving) and switching the
  active adapter costs nothing. When no example is routed to an adapter (adapters disabled, or every row asks
  for the base) the base model is called directly: bit for bit the base, and no intervention runs.
- Positions are counted over the prompt (`prompt_mask` from the collator, else the attention mask), so left and
  right padding give the same edits and users never build index lists by hand. `positions=` overrides them for
  one call (every binding of the call), e.g. with pyreft's explicit `[batch, K]` locations.
- With labels, the LM head and the loss are computed only at label positions (`logits_to_keep` as a boolean
  mask, so `logits` come back flattened to `[label tokens, vocab]`): on a 49k vocabulary that is most of the
  head's cost. `num_items_in_batch` (the label count of a whole accumulation window, as HF's Trainer passes it)
  turns the mean into `sum / num_items_in_batch`, so gradient accumulation equals one large batch.
- `train()` / `eval()` reach the interventions (they are submodules), so dropout follows the mode.
- `modules_to_save` (a classification head, say) are modules of the base model, trained and saved with the
  adapters that list them; adapters listing the same module share it.
- Saving writes `adapter_config.json` + `adapter_model.safetensors` (a few hundred KB); loading builds
  interventions from registry names and refuses a model they do not fit.
- The config records the base model (`base_model`: source, architecture, widths, a weight fingerprint; see
  `reftkit.adapters`); loading onto another model is an `IncompatibleModelError` naming both, unless
  `check_base=False` (an adapter meant for a fine-tuned variant of its base). Folders without the record load.
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
from ..adapters import base_model_record, check_base_model, naming_bases
from ..atomic import write_folder
from ..engine import Binding, IntervenableModel
from ..errors import ConfigError, IncompatibleModelError, MissingDependencyError, ReftkitError
from ..interventions import build_intervention
from ..io import check_weight_dtypes
from ..sites import Site, model_dims, resolve_site
from .config import ReftConfig, read_pyreft_adapter

log = logging.getLogger(__name__)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def get_reft_model(model: nn.Module, config: ReftConfig, adapter_name: str = "default") -> "ReftModel":
    """Freeze `model` and attach a fresh ReFT adapter described by `config`."""
    return ReftModel(model, config, adapter_name)


class ReftModel(nn.Module):
    accepts_loss_kwargs = True  # forward takes `num_items_in_batch` (read by HF's Trainer)

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
        self._slots: dict[str, list[tuple[Site, object, str]]] = {}
        self._binding_adapter: list[str] = []
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters and _mask_logits_ok()
        if config is not None:
            self.add_adapter(adapter_name, config)

    @property
    def config(self):
        """The base model's config (what HF tooling reads from a model)."""
        return self.model.config

    def can_generate(self) -> bool:
        return callable(getattr(self.model, "can_generate", None)) and self.model.can_generate()

    # ---- adapters ---------------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: ReftConfig, *, activate: bool = True) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in "/\\.\0"):
            raise ConfigError(f"adapter names cannot be empty or contain '/', '\\', '.' or NUL, got {name!r}")
        if name in self.configs:
            raise ConfigError(f"an adapter named {name!r} exists already; adapters: {list(self.configs)}")
        if not isinstance(config, ReftConfig):
            raise ConfigError(f"add_adapter takes a ReftConfig, got {type(config).__name__}")
        ivs, slots = nn.ModuleList(), []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for spec in config.sites(model_dims(self.model).n_layers):
                site = Site(layer=spec.layer, component=spec.component)
                width = resolve_site(self.model, site).width
                iv_config = config.intervention_config(spec, width, site.name)
                for suffix, pos in config.split_positions():
                    ivs.append(build_intervention({"type": spec.method, "config": iv_config}))
                    slots.append((site, pos, f"{name}/{site.name}" + (f".{suffix}" if suffix else "")))
        for path in config.modules_to_save:
            try:
                self.model.get_submodule(path)
            except AttributeError:
                raise ConfigError(f"modules_to_save names {path!r}, which is not a module of "
                                  f"{type(self.model).__name__}") from None
        self.adapters[name] = ivs.to(next(self.model.parameters()).device)
        self.configs[name] = config
        self._slots[name] = slots
        self._sync_modules_to_save(trainable=config.modules_to_save)
        if activate or self.active_adapter is None:
            self.active_adapter = name
        self._rebuild()

    def _sync_modules_to_save(self, trainable=()) -> None:
        """`modules_to_save` = the union over adapters; newly listed modules become trainable, unlisted frozen."""
        wanted = {path for c in self.configs.values() for path in c.modules_to_save}
        for key in list(self.modules_to_save):
            if key not in {_key(path) for path in wanted}:
                self.modules_to_save[key].requires_grad_(False)
                del self.modules_to_save[key]
        for path in wanted:
            if _key(path) not in self.modules_to_save:
                self.modules_to_save[_key(path)] = self.model.get_submodule(path)
        for path in trainable:
            self.modules_to_save[_key(path)].requires_grad_(True)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        del self.adapters[name]
        del self.configs[name]
        del self._slots[name]
        self._sync_modules_to_save()
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.configs), None)
        self._rebuild()

    def set_adapter(self, name: str) -> None:
        self._require(name)
        self.active_adapter = name

    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

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
        for name, slots in self._slots.items():
            for (site, pos, tag), iv in zip(slots, self.adapters[name]):
                bindings.append(Binding(site, iv, tag, pos))
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
    def _active(self, batch: int, adapter_names, device) -> torch.Tensor | None:
        """bool [batch, bindings]: which binding edits which example; None when no example uses an adapter."""
        if adapter_names is None:
            adapter_names = self.active_adapter
        if isinstance(adapter_names, str) or adapter_names is None:
            adapter_names = [adapter_names] * batch
        adapter_names = list(adapter_names)
        if len(adapter_names) != batch:
            raise ReftkitError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch}")
        for a in set(adapter_names):
            if a is not None:
                self._require(a)
        if not self._enabled or self._engine is None or all(a is None for a in adapter_names):
            return None
        rows = [[owner == a for owner in self._binding_adapter] for a in adapter_names]
        return torch.tensor(rows, dtype=torch.bool, device=device).reshape(batch, len(self._binding_adapter))

    # ---- forward / generate -----------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, prompt_mask=None, adapter_names=None,
                positions=None, num_items_in_batch=None, **kwargs):
        """The base model's forward with the adapters (the active one, or `adapter_names` per example).
        `prompt_mask` is the region positions are counted over (default: the attention mask); `positions`
        replaces every binding's positions for this call; further keyword arguments go to the model."""
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ReftkitError("ReftModel.forward needs input_ids or inputs_embeds")
        active = self._active(ref.shape[0], adapter_names, ref.device)
        causal_labels = labels is not None and self._keep_logits and labels.dim() == 2
        if causal_labels:
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100
            kwargs["logits_to_keep"] = keep
        elif labels is not None:
            kwargs["labels"] = labels
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if active is None:
            out = self.model(**inputs)
        else:
            region = prompt_mask if prompt_mask is not None else attention_mask
            out = self._engine.run(inputs, active=active, region_mask=region, positions=positions).output
        if causal_labels:
            logits = out.logits.float()
            target = labels[:, 1:][keep[:, :-1]]
            if num_items_in_batch is None:
                out.loss = F.cross_entropy(logits, target) if target.numel() else logits.sum() * 0.0
            else:
                out.loss = F.cross_entropy(logits, target, reduction="sum") / num_items_in_batch
        elif labels is not None and num_items_in_batch is not None and getattr(out, "loss", None) is not None:
            counted = labels[:, 1:] if labels.dim() == 2 and self.can_generate() else labels  # the model's mean
            out.loss = out.loss * (counted != -100).sum() / num_items_in_batch
        return out

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, adapter_names=None, positions=None, **generate_kwargs):
        """Generate with the active adapter, or one adapter per example (`adapter_names=[...]`, None = base).
        Positions are resolved on each prompt's real tokens; edits on the prompt are baked into the KV cache."""
        if input_ids is None:
            raise ReftkitError("ReftModel.generate needs input_ids")
        active = self._active(input_ids.shape[0], adapter_names, input_ids.device)
        if active is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        return self._engine.generate(input_ids, attention_mask, active=active, positions=positions,
                                     **generate_kwargs)

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
            for path in self.configs[name].modules_to_save:
                for k, v in self.model.get_submodule(path).state_dict().items():
                    state[f"modules.{_key(path)}.{k}"] = v.detach().contiguous().cpu()
        return state

    def save_pretrained(self, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """Write each adapter (or one) as `adapter_config.json` + `adapter_model.safetensors`; the default
        adapter (or a single one) goes in `directory`, others in `directory/<name>/`. Writes are atomic."""
        directory = Path(directory)
        names = [adapter_name] if adapter_name else list(self.configs)
        if not names:
            raise ConfigError("this ReftModel has no adapter to save")
        for name in names:
            target = directory if name == "default" or len(names) == 1 else directory / name
            meta = {"reftkit_version": __version__, "adapter_name": name, "config": self.configs[name].to_dict(),
                    "model": _fingerprint(self.model),
                    "base_model": base_model_record(self.model, self.configs[name].modules_to_save)}
            write_folder(target, {CONFIG_NAME: json.dumps(meta, indent=2)}, {WEIGHTS_NAME: self.adapter_state_dict(name)})
        return directory

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, positions: str | None = None,
                        check_base: bool = True) -> "ReftModel":
        """Load an adapter saved by `save_pretrained` (or a pyreft 0.1.0 folder) onto `model`. `positions`
        replaces the saved positions; a pyreft folder does not record them, so it needs them (e.g. "f1+l1").
        `model` must be the base the adapter records (same architecture and widths, and the same weights unless
        `check_base=False`), else `IncompatibleModelError` names both."""
        reft = cls(model)
        reft.load_adapter(directory, adapter_name, is_trainable=is_trainable, positions=positions,
                          check_base=check_base)
        return reft

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", *,
                     is_trainable: bool = False, positions: str | None = None, check_base: bool = True) -> None:
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() and (directory / "config.json").is_file() \
                and any(directory.glob("intkey_*.bin")):
            config, state = read_pyreft_adapter(directory, positions)
        else:
            config, state = _read_adapter(directory, self.model, check_base=check_base)
            if positions is not None:
                config.positions = positions
                config.position_spec()
        try:
            self.add_adapter(adapter_name, config)
        except ReftkitError as e:  # a site this model lacks, a rank above its width, ...: name the folder
            if str(directory) in str(e):
                raise
            raise type(e)(f"{directory}: {e}") from e
        except (TypeError, ValueError, OverflowError) as e:  # a field the config checks let through
            raise ConfigError(f"{directory}: the adapter cannot be built on this model ({type(e).__name__}: {e})") from e
        try:
            self._load_state(adapter_name, state, directory)
        except BaseException:  # weights that do not fit leave no half-loaded adapter behind
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.adapters[adapter_name].requires_grad_(False)
            for path in config.modules_to_save:
                self.model.get_submodule(path).requires_grad_(False)

    def _load_state(self, name: str, state: dict, where) -> None:
        used = set()
        parts = [(f"interventions.{i}.", iv, f"intervention {i}") for i, iv in enumerate(self.adapters[name])]
        parts += [(f"modules.{_key(p)}.", self.model.get_submodule(p), f"module {p}")
                  for p in self.configs[name].modules_to_save]
        for prefix, module, what in parts:
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            used |= {prefix + k for k in part}
            check_weight_dtypes(module, part, f"{where}: {what}")
            try:
                module.load_state_dict(part, strict=True)
            except (RuntimeError, ReftkitError) as e:
                raise IncompatibleModelError(f"adapter weights in {where} do not fit {what}: {e}") from e
        unused = sorted(set(state) - used)
        if unused:
            raise ConfigError(f"{where}: the adapter holds weights its config does not describe: {unused[:5]}")

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload ReFT adapter") -> str:
        """Upload the adapters to the Hugging Face Hub (needs `huggingface_hub` and network access)."""
        try:
            from huggingface_hub import HfApi
        except ImportError as e:
            raise MissingDependencyError("push_to_hub needs huggingface_hub: pip install 'reftkit[hub]'") from e
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            self.save_pretrained(folder)
            api = HfApi(token=token)
            api.create_repo(repo_id, exist_ok=True, private=private)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
        return repo_id


def _read_adapter(directory: Path, model: nn.Module, *, check_base: bool = True
                  ) -> tuple[ReftConfig, dict[str, torch.Tensor]]:
    """The config and weights of a folder written by `save_pretrained`, checked against `model`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{directory} holds no {CONFIG_NAME}; save adapters with save_pretrained()")
    try:  # UTF-8, a byte order mark allowed
        meta = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an int too long to convert, deep nesting
        raise ConfigError(f"{path} is not a valid adapter config ({type(e).__name__}: {e}); expected the JSON "
                          "object save_pretrained() writes") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or \
            not isinstance(meta.get("model", {}), dict):
        raise ConfigError(f"{path} is not a valid adapter config: expected an object with a 'config' object (and a "
                          "'model' object); save the adapter again with save_pretrained()")
    try:
        config = ReftConfig.from_dict(meta["config"])
    except ReftkitError as e:
        raise type(e)(f"{path}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path} is not a valid adapter config ({type(e).__name__}: {e}); "
                          "save the adapter again with save_pretrained()") from e
    saved_model = meta.get("model", {})
    try:
        _check_fingerprint(saved_model, model, directory)
    except IncompatibleModelError as e:
        raise naming_bases(e, meta.get("base_model"), model) from None
    check_base_model(meta.get("base_model"), model, directory, check_weights=check_base,
                     skip_modules=config.modules_to_save)
    try:
        return config, load_file(str(directory / WEIGHTS_NAME))
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"cannot read the adapter weights {directory / WEIGHTS_NAME}: {e}") from e


def _key(path: str) -> str:
    return path.replace(".", "__")


def _mask_logits_ok() -> bool:
    """Whether the installed transformers slices logits with a boolean `[batch, seq]` mask (5.x does)."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def _fingerprint(model: nn.Module) -> dict:
    d = model_dims(model)
    return {"model_type": d.model_type, "hidden_size": d.hidden, "num_layers": d.n_layers}


def _check_fingerprint(saved: dict, model: nn.Module, where) -> None:
    now = _fingerprint(model)
    for key in ("hidden_size", "num_layers"):
        if key in saved and saved[key] != now[key]:
            raise IncompatibleModelError(
                f"the adapter in {where} was trained on a model with {key}={saved[key]!r}, but this model has "
                f"{key}={now[key]}; load it onto the model it was trained for"
            )
    if saved.get("model_type") and saved["model_type"] != now["model_type"]:
        raise IncompatibleModelError(
            f"the adapter in {where} was trained on a {saved['model_type']} model, not on this "
            f"{now['model_type']} model; load it onto the architecture it was trained for"
        )
