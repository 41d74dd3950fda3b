"""Benchmarks: each measures a baseline and Afterward in the same run and prints the ratio."""
