"""reftkit: interventions on hidden representations and Representation Finetuning (ReFT).

The public API is resolved lazily (PEP 562 module `__getattr__`): `import reftkit` imports nothing heavy, and
each name pulls in only the module that defines it.
"""

from __future__ import annotations

from importlib import import_module as _import_module  # only on the fixed table below, never on user input

__version__ = "0.1.0"

# public name -> defining submodule (a fixed table; never driven by config strings)
_EXPORTS = {
    "load_model": "reftkit.models",
    "list_models": "reftkit.models",
    "build_tiny_model": "reftkit.models",
    "Site": "reftkit.sites",
    "Positions": "reftkit.positions",
    "IntervenableModel": "reftkit.engine",
    "Binding": "reftkit.engine",
    "ReftConfig": "reftkit.reft.config",
    "get_reft_model": "reftkit.reft.model",
    "ReftModel": "reftkit.reft.model",
    "ReftTrainer": "reftkit.reft.trainer",
    "errors": "reftkit.errors",
}


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'reftkit' has no attribute {name!r}")
    module = _import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS) + ["__version__"]
