"""Tests build tiny seeded models: never the shipped pretrained base that RunConfig defaults to."""

from __future__ import annotations

TINY = {"model-config": "tiny", "pretrained": ""}
"""Run-config overrides for a seeded ``tiny`` model (add them to every test's run configuration)."""
