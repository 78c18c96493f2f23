"""Map a flow's pydantic config onto command-line options and YAML files.

The pydantic model is the single source of defaults and help texts: every field becomes an option
(nested models as ``--section-field``), a YAML file given with ``--config`` fills the same fields,
and options given on the command line win. Nothing here restates a default.

Written by hand because neither argparse nor Prefect derives a CLI from a pydantic model, and the
libraries that do (typer, pydantic-settings' CLI) would restate each option's default in a second
place or cannot mix a YAML file with option overrides.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from tasks.core.settings import deep_merge

_SUPPRESS = argparse.SUPPRESS


class ConfigError(ValueError):
    """A config file or option that does not fit the flow's config model."""


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default)) or "none"
    return "none" if default is None else str(default)


def add_model_options(
    parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "", skip: set[str] | None = None
) -> None:
    """One option per field of ``model`` (recursively), all defaulting to "not given"."""
    skip = skip or set()
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        annotation, optional = _unwrap_optional(field.annotation)
        dest = f"{prefix}{name}"
        if _is_model(annotation):
            group = parser.add_argument_group(f"{name} options", field.description or annotation.__doc__)
            add_model_options(group, annotation, prefix=f"{dest}.")  # type: ignore[arg-type]
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = str(extra.get("flag") or "--" + dest.replace(".", "-").replace("_", "-"))
        # argparse %-formats help texts; the descriptions are plain text (also shown elsewhere)
        help_text = f"{field.description or ''} (default: {_default_text(field)})".strip().replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest, "default": _SUPPRESS, "help": help_text}
        if extra.get("positional"):
            positional = {"help": field.description, "metavar": name.upper()}
            if not field.is_required():
                positional["nargs"] = "?"
            parser.add_argument(dest, default=_SUPPRESS, **positional)
            continue
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
            kwargs["metavar"] = "{" + ",".join(map(str, kwargs["choices"])) + "}"
        elif origin in (list, tuple, set):
            (item,) = typing.get_args(annotation)[:1] or (str,)
            kwargs["nargs"] = "+"
            kwargs["type"] = _scalar_parser(item)
            kwargs["metavar"] = name.rstrip("s").upper()
        elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            kwargs["choices"] = [e.value for e in annotation]
        else:
            kwargs["type"] = _scalar_parser(annotation)
            kwargs["metavar"] = {int: "N", float: "X", Path: "PATH"}.get(annotation, name.upper())
        if optional and annotation is not bool:
            kwargs["help"] += " ('none' to unset)"
            inner = kwargs.get("type", str)
            kwargs["type"] = lambda text, inner=inner: None if text.lower() == "none" else inner(text)
        parser.add_argument(flag, **kwargs)


def _scalar_parser(annotation: Any):
    if annotation in (int, float, str):
        return annotation
    if annotation is Path:
        return Path
    return str


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ConfigError(f"'{key}' must be a section (a mapping), not a value")
    target[keys[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values at the top level")
    return data


def build_config(
    model: type[BaseModel], args: argparse.Namespace, config_file: str | Path | None = None
) -> BaseModel:
    """The config from (the model's defaults) < (YAML file) < (command-line options), validated."""
    data: dict[str, Any] = {}
    source = "command line"
    if config_file:
        data = deep_merge(data, load_yaml(config_file))
        source = f"{config_file} or the command line"
    for dest, value in vars(args).items():
        if "." in dest or dest in model.model_fields:
            _set_dotted(data, dest, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:  # a check of the whole config (an input that does not exist, ...)
                problems.append(message)
                continue
            where = "-".join(str(p) for p in error["loc"]).replace("_", "-")
            got = (
                f" (got {error['input']!r})"
                if "input" in error and not isinstance(error["input"], dict)
                else ""
            )
            problems.append(f"--{where}: {message}{got}")
        raise ConfigError(f"invalid settings from the {source}:\n  " + "\n  ".join(problems)) from None
