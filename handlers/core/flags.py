"""Command-line flags generated from the request schema, so that a command's options are the schema's
fields, with their types, choices, bounds and descriptions (query.py's, and the archiver's defaults)."""

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from handlers.core.images import IMAGE_FIELDS


def add_schema_arguments(parser: argparse._ActionsContainer, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of model (unset: None, so the next layer's default applies); image fields take a
    file's path."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        if name in IMAGE_FIELDS:
            parser.add_argument(flag, type=Path, metavar="FILE", help=help_text(info))
            continue
        kind, choices = value_type(info.annotation)
        parser.add_argument(flag, type=kind, choices=choices, metavar=None if choices else name.upper(),
                            help=help_text(info))


def schema_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of model that the command line set."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}


def value_type(annotation: Any) -> tuple[Any, list | None]:
    """How a flag's text becomes the field's value, and its choices where the field has some."""
    options = [option for option in _union_members(annotation) if option is not type(None)]
    literals = [option for option in options if typing.get_origin(option) is Literal]
    if literals:
        return str, [value for literal in literals for value in typing.get_args(literal)]
    if options == [bool]:
        return parse_bool, None
    if options in ([int], [float]):
        return options[0], None
    if any(typing.get_origin(option) is dict for option in options):
        return name_or_json_object, None
    return str, None


def help_text(info: FieldInfo) -> str:
    bounds = [f">= {item.ge}" for item in info.metadata if isinstance(item, Ge)]
    bounds += [f"<= {item.le}" for item in info.metadata if isinstance(item, Le)]
    text = (info.description or "").replace("%", "%%")
    return f"{text} ({', '.join(bounds)})" if bounds else text


def parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def name_or_json_object(text: str) -> str | dict:
    """A name, or a JSON object such as {"style": 0.5, "ink": 0.8}."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def _union_members(annotation: Any) -> list:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]
