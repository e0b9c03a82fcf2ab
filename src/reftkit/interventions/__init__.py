"""Interventions: one module per family; importing this package registers every type by name."""

from . import basic  # noqa: F401  (registers)
from . import das, sae  # noqa: F401
from . import reft  # noqa: F401
from . import steering  # noqa: F401
from .base import REGISTRY, Intervention, InterventionConfig, build_intervention, intervention_types, register

__all__ = ["REGISTRY", "Intervention", "InterventionConfig", "build_intervention", "intervention_types", "register"]
