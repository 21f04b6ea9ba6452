"""Development tools, not shipped: the models tests and benchmarks are built with (models/), the servers
they start (harness/), the baselines they compare against (baselines/), and the benchmarks (bench/).

They sit apart from the runtime (handlers/) and the archiver (archiver/), which import nothing from here
(tests/unit/test_layout.py): they build models and archives the way a user would, through the archiver."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: its config.properties and scripts
