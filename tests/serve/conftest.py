"""Fixtures of the serving tests (the helpers are in util.py)."""

from __future__ import annotations

import pytest

from .util import assets_in, make_app, running


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return assets_in(tmp_path_factory.mktemp("serve-assets"))


@pytest.fixture(scope="module")
def server(assets):
    """A shared server (no API key) -> its base URL."""
    app = make_app(assets, max_batch_size=8, max_wait_ms=30, max_new_tokens=64)
    with running(app) as url:
        yield url
