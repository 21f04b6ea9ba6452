"""Test and benchmark tooling: real servers started, driven and stopped for tests/ and scripts/bench.py."""
