"""Fixtures for the hypervisor tests; the helpers live in hvkit."""

from hvkit import machine  # noqa: F401
