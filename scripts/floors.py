"""Print pyproject.toml's dependency floors as pip constraints: every `name>=X` becomes `name==X`.

scripts/test_floors.sh installs with them, so the unit tests run on the oldest versions that
pyproject.toml admits. Standard library only: it runs before any environment exists.
"""

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(>=|==)\s*([^,;\s]+)\s*$")


def floor_pins(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for line in requirements:
        match = REQUIREMENT.match(line)
        if match is None:
            raise SystemExit(f"error: {line!r} is not `name>=floor` or `name==version`; its floor cannot be pinned")
        name, _, version = match.groups()
        pins.append(f"{name}=={version}")
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(floor_pins(root / "pyproject.toml", sys.argv[1:])))
