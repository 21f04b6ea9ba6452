"""Pipelines built from code for tests and benchmarks (tiny ones, full-size ones with random weights),
and the digits model's trainer and oracle."""
