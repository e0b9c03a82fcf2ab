"""Steering: vectors (`SteeringVector`), operators, scopes and applying them to a model.

`vector.py` holds the data, `operators.py` turns one site's direction into an engine intervention, `apply.py`
binds vectors to a model (`steer`, `SteeringVector.apply`) with scopes on absolute positions, and `extract.py`
makes vectors from contrasting examples. Nothing heavy is imported until a name is used.
"""

from __future__ import annotations

_EXPORTS = {
    "SteeringVector": "vector",
    "OPERATORS": "operators",
    "build_operator": "operators",
    "steer": "apply",
    "Steered": "apply",
    "scope_positions": "apply",
    "SCOPES": "apply",
    "actadd": "extract",  # `extract` itself: reftkit.steer.extract.extract (the module has the same name)
    "refusal_direction": "refusal",
    "refusal_addition": "refusal",
    "LanguageNeurons": "lape",  # `lape` and `iti` themselves: reftkit.steer.lape.lape, reftkit.steer.iti.iti
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reftkit.steer' has no attribute {name!r}")
    if module == "vector":
        from . import vector as found
    elif module == "operators":
        from . import operators as found
    elif module == "apply":
        from . import apply as found
    elif module == "refusal":
        from . import refusal as found
    elif module == "lape":
        from . import lape as found
    else:
        from . import extract as found
    return getattr(found, name)


__all__ = list(_EXPORTS)
