"""Where a suite's results go: <out>/<name>.json (the figures) and <name>.md (the tables), printed too."""

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, Python {platform.python_version()}"


def save(out: Path, name: str, results: dict, lines: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2, default=str))
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    print(text)
