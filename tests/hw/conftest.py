"""Fixtures for the SoC tests; the helpers live in hwkit (importable by name, unlike conftest)."""

from hwkit import sev_tables, soc  # noqa: F401
