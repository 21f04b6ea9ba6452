"""README's tables and the published JSON Schema, generated from the request schema and the handler settings:
`python -m devtools.docs` writes them, `python -m devtools.docs --check` says which are stale (a test runs it).

A generated table sits in README between `<!-- generated: NAME -->` and `<!-- end: NAME -->`.
"""

import argparse
import json
import re
import sys

from pydantic import BaseModel

from devtools import REPO_ROOT
from handlers.core.config import HandlerConfig
from handlers.core.formats import IMAGE_CODECS, OUTPUT_FORMATS
from handlers.core.limits import Limits
from handlers.core.schema import SHARED_IN_BATCH, GenerationDefaults, GenerationRequest, request_json_schema

README = REPO_ROOT / "README.md"
SCHEMA = REPO_ROOT / "docs" / "request.schema.json"
DEFAULT_WORDS = {"prompt": "required", "seed": "random", "task": "inferred"}


def allowed(schema: dict) -> str:
    """A field's type, bounds and choices, in words."""
    branches = [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]
    words = []
    for branch in branches:
        if "enum" in branch:
            words.append(", ".join(f"`{value}`" for value in branch["enum"]))
        elif branch.get("type") == "array":
            words.append(f"a list of {branch['items'].get('type', 'values')}s")
        elif branch.get("type") == "object":
            words.append(f"an object of names to {branch.get('additionalProperties', {}).get('type', 'value')}s")
        else:
            bounds = [number(branch["minimum"]) if "minimum" in branch else "", number(branch["maximum"]) if "maximum" in branch else ""]
            text = branch.get("type", "any")
            if any(bounds):
                text += f" {bounds[0]} to {bounds[1]}" if all(bounds) else f" >= {bounds[0]}" if bounds[0] else f" <= {bounds[1]}"
            if "multipleOf" in branch:
                text += f", a multiple of {branch['multipleOf']}"
            if "maxLength" in branch:
                text += f", at most {branch['maxLength']} characters"
            if branch.get("contentEncoding") == "base64":
                text = "an image: base64 in JSON, or a file part"
            words.append(text)
    return " or ".join(words)


def number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def default_of(name: str, schema: dict) -> str:
    if name in DEFAULT_WORDS:
        return DEFAULT_WORDS[name]
    value = schema.get("default")
    return "none" if value is None else f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def field_rows(model: type[BaseModel], names: list[str], with_batch: bool) -> list[str]:
    properties = model.model_json_schema()["properties"]
    rows = []
    for name in names:
        schema = properties[name]
        description = (schema.get("description") or "").replace("|", "\\|")
        cells = [f"`{name}`", allowed(schema), default_of(name, schema), description]
        if with_batch:
            cells.append("yes" if schema.get(SHARED_IN_BATCH) else "no")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def request_table() -> list[str]:
    names = ["prompt", *[name for name in GenerationRequest.model_fields if name != "prompt"]]
    return ["| field | allowed | default | what it does | batch-mates may differ |", "|---|---|---|---|---|",
            *field_rows(GenerationRequest, names, with_batch=True)]


def settings_table() -> list[str]:
    names = [name for name in HandlerConfig.model_fields
             if name not in GenerationDefaults.model_fields and name not in Limits.model_fields]
    return ["| setting | allowed | default | what it does |", "|---|---|---|---|",
            *field_rows(HandlerConfig, names, with_batch=False)]


def limits_table() -> list[str]:
    return ["| limit | allowed | default | what it bounds |", "|---|---|---|---|",
            *field_rows(Limits, list(Limits.model_fields), with_batch=False)]


def formats_table() -> list[str]:
    rows = ["| output_format | answer | Content-Type |", "|---|---|---|"]
    for name, what in OUTPUT_FORMATS.items():
        media_type = IMAGE_CODECS[name].media_type if name in IMAGE_CODECS else "application/json"
        rows.append(f"| `{name}` | {what} | `{media_type}` |")
    return rows


TABLES = {"request-fields": request_table, "handler-settings": settings_table, "limits": limits_table,
          "output-formats": formats_table}


def generated_readme(text: str) -> str:
    for name, table in TABLES.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- generated: {name} --> ... <!-- end: {name} --> block")
        text = pattern.sub(lambda match: match[1] + "\n".join(table()) + "\n" + match[2], text)
    return text


def published_schema() -> str:
    return json.dumps(request_json_schema(), indent=2, sort_keys=True) + "\n"


def stale() -> list[str]:
    """What differs from what the schema generates."""
    found = []
    if README.read_text() != generated_readme(README.read_text()):
        found.append(str(README.relative_to(REPO_ROOT)))
    if not SCHEMA.is_file() or SCHEMA.read_text() != published_schema():
        found.append(str(SCHEMA.relative_to(REPO_ROOT)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say which files are stale (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        print("stale: " + ", ".join(found) + " (python -m devtools.docs)" if found else "up to date")
        return 1 if found else 0
    README.write_text(generated_readme(README.read_text()))
    SCHEMA.write_text(published_schema())
    print(f"wrote {README.name}'s tables and {SCHEMA.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
