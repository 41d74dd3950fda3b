"""Afterward test suite."""
