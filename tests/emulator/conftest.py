"""Emulator-suite fixtures; PostgreSQL and the emulator factory live in tests/conftest.py."""

from __future__ import annotations

import threading

import pytest


@pytest.fixture(autouse=True)
def no_emulator_left_running():
    """Every emulator a test started is stopped and its thread joined by the end."""
    yield
    alive = [t for t in threading.enumerate() if t.name == "alloydb-emulator"]
    assert alive == [], "an emulator thread outlived its test"
