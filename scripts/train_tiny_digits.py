#!/usr/bin/env python3
"""Train the tiny digits pipeline reproducibly (fixed seeds) into archiver/models/tiny-digits."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archiver.digits import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
