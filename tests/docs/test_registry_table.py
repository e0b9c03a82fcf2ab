"""The intervention types page lists exactly the registry: names, classes, sources and config fields."""

from __future__ import annotations

import dataclasses
import re

from reftkit.interventions import REGISTRY

from .markdown import DOCS, table_rows


def rows() -> dict[str, list[str]]:
    found = {}
    for cells in table_rows((DOCS / "interventions.md").read_text(encoding="utf-8")):
        m = re.fullmatch(r"`([a-z_]+)`", cells[0])
        if m and len(cells) == 5:
            assert m.group(1) not in found, f"{m.group(1)} is listed twice"
            found[m.group(1)] = cells
    return found


def test_the_table_lists_exactly_the_registered_names():
    assert sorted(rows()) == sorted(REGISTRY)


def test_each_row_names_its_class_source_and_config_fields():
    for name, (_, klass, source, fields, _) in rows().items():
        cls = REGISTRY[name]
        m = re.fullmatch(r"\[`(\w+)`\]\[([\w.]+)\]", klass)
        assert m, f"{name}: the class cell should be [`Class`][module.Class], got {klass!r}"
        assert m.group(1) == cls.__name__ and m.group(2) == f"{cls.__module__}.{cls.__name__}", name
        assert source == cls.source, name
        expected = [f.name for f in dataclasses.fields(cls.config_class) if f.name != "embed_dim"]
        listed = re.findall(r"`(\w+)`", fields)
        assert listed == expected, name
