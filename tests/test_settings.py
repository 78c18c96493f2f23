"""One source of every setting: each command's --help shows the defaults its config uses, a nested
override keeps the other defaults, and presets expand however a config is made."""

from __future__ import annotations

import argparse
import enum
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows.cli import build_parser
from flows.cli.options import build_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"

# the least each command needs; every other setting is its config's default
REQUIRED = {
    "text": ["--corpus", str(DATA / "scifact-sample")],
    "evaluate": ["--data", str(DATA / "scifact-sample")],
    "supervised": ["--train", str(DATA / "quora-sample" / "train.tsv")],
    "clip": ["--catalog", str(DATA / "fashion-sample" / "styles.csv")],
    "refresh": ["--catalog", str(DATA / "fashion-sample" / "styles.csv")],
    "search": ["a query"],
    "export": ["--onnx"],
    "models list": [],
    "models show": ["text-retriever"],
    "models promote": ["text-retriever", "v0001"],
}


def _subparser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _shown(value) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _fields(config: BaseModel, prefix: str = ""):
    """(dest, field info, value used) of every leaf setting, nested sections included."""
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            yield from _fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field, value


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_help_shows_the_defaults_the_config_uses(command, capsys):
    parser = build_parser()
    path = command.split()
    sub = _subparser(parser, path)
    args = parser.parse_args([*path, *REQUIRED[command]])
    config = build_config(args.config_model if hasattr(args, "config_model") else _flow_config(command), args)
    with pytest.raises(SystemExit):
        parser.parse_args([*path, "--help"])
    # argparse wraps lines (and breaks words at hyphens): compare with all whitespace removed
    help_text = "".join(capsys.readouterr().out.split())
    actions = {a.dest: a for a in sub._actions}
    given = set(vars(args))
    checked = 0
    for dest, field, value in _fields(config):
        action = actions.get(dest)
        if action is None or action.option_strings == []:  # positional: no default to show
            continue
        shown = "required" if field.is_required() or dest in given else _shown(value)
        if dest in given and not field.is_required():
            shown = _shown(field.get_default(call_default_factory=True))
        expected = "".join(f"{field.description} (default: {shown})".split())
        assert "".join(action.help.replace("%%", "%").split()).startswith(expected), dest
        assert action.option_strings[0] in help_text and expected in help_text, dest
        checked += 1
    assert checked >= len(list(_fields(config))) - 3


def _flow_config(command: str) -> type:
    from flows.cli.flow_commands import FLOW_COMMANDS

    return next(config for name, _, config, _ in FLOW_COMMANDS if name == command)()


def test_a_nested_override_keeps_the_other_defaults():
    from flows.adapt_text import AdaptTextConfig
    from flows.catalog_refresh import RefreshConfig, RefreshTrainConfig

    parser = build_parser()
    args = parser.parse_args(["refresh", *REQUIRED["refresh"], "--train-learning-rate", "1e-5"])
    refresh = build_config(RefreshConfig, args)
    assert refresh.train.learning_rate == 1e-5 and refresh.train.time_budget_minutes == 30
    defaults = RefreshTrainConfig().model_dump()
    assert {k: v for k, v in refresh.train.model_dump().items() if k != "learning_rate"} == {
        k: v for k, v in defaults.items() if k != "learning_rate"
    }
    # the same as a deployment's parameters or a Python call
    as_parameters = RefreshConfig.model_validate(
        {"catalog": REQUIRED["refresh"][1], "train": {"learning_rate": 1e-5}}
    )
    assert as_parameters.train == refresh.train

    args = parser.parse_args(["text", *REQUIRED["text"], "--qgen-queries-per-doc", "5"])
    text = build_config(AdaptTextConfig, args)
    assert text.qgen.queries_per_doc == 5
    assert text.qgen.model_copy(update={"queries_per_doc": 3}) == type(text.qgen)()


def test_preset_gpl_expands_from_every_entry_point(tmp_path):
    from flows.adapt_text import PRESETS, AdaptTextConfig, adapt_text_flow

    gpl = PRESETS["gpl"]
    corpus = REQUIRED["text"][1]
    # a deployment's parameters reach the flow through Prefect's own parameter validation
    parameters = adapt_text_flow.validate_parameters({"config": {"corpus": corpus, "preset": "gpl"}})
    for config in (parameters["config"], AdaptTextConfig.model_validate({"corpus": corpus, "preset": "gpl"})):
        assert config.base_model == gpl["base_model"]
        assert config.qgen.generator == gpl["qgen"]["generator"] and config.qgen.consistency_top_k is None
        assert config.label.teacher == gpl["label"]["teacher"]
    # from the command line and a YAML file, settings given win over the preset's
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"corpus: {corpus}\npreset: gpl\nqgen:\n  queries_per_doc: 7\n")
    args = build_parser().parse_args(["text", "--config", str(settings), "--label-teacher", "offline"])
    config = build_config(AdaptTextConfig, args, args.config)
    assert config.qgen.generator == gpl["qgen"]["generator"] and config.qgen.queries_per_doc == 7
    assert config.label.teacher == "offline" and config.base_model == gpl["base_model"]
    offline = AdaptTextConfig.model_validate({"corpus": corpus})
    assert offline.qgen.generator == "offline" and offline.base_model == "all-MiniLM-L6-v2"


def test_no_default_is_restated_in_a_signature():
    """The workspace, registry names and image size are constants, not literals repeated by hand."""
    literals = ('"adapt-workspace"', '"text-retriever"', '"catalog-clip"', '"catalog-text"', "(80, 60)")
    offenders = []
    for package in ("tasks", "finetune", "flows"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "defaults.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if any(lit in code for lit in literals) and '"""' not in code and "Searcher(" not in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
