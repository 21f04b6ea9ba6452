#!/usr/bin/env python3
"""The benchmarks' command line; the suites live in devtools/bench/ (see its cli.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
