"""`Binding`: one intervention at one site, the unit the engine installs. Its own module so that the file
formats (io.py) can rebuild bindings without importing the engine (the engine imports io, never the reverse)."""

from __future__ import annotations

from dataclasses import dataclass

from .interventions.base import Intervention
from .positions import Positions
from .sites import Site


@dataclass
class Binding:
    """One intervention at one site. `positions` apply when a call passes none for this binding (and the
    model's `default_positions` when neither does); `source` names which source input feeds it (interchange
    types); `source_site` / `source_positions` read the source somewhere else than where the base is written."""

    site: "Site | str | dict"
    intervention: Intervention
    name: str | None = None
    positions: "Positions | str | None" = None
    source: int = 0
    source_site: "Site | str | dict | None" = None
    source_positions: "Positions | str | None" = None
