import json

import pytest

from flows.cli import build_parser, main
from flows.evaluate import EvaluateConfig

from helpers import write_beir_subset


def test_help_lists_commands_and_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "evaluate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for name, field in EvaluateConfig.model_fields.items():
        # the option, then its whole help text (argparse wraps lines), not just a word that the epilog may hold
        option = "--" + name.replace("_", "-")
        assert option in flat
        help_at = flat.index(" ".join(field.description.split()), flat.index(option))
        assert help_at - flat.index(option, flat.index("options:")) < 80, name


def test_bad_arguments_get_a_clear_message_and_exit_2(prefect_harness, capsys, tmp_path, scifact_sample):
    assert main(["evaluate", "--data", str(tmp_path / "none")]) == 2
    assert "expected a BEIR folder" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(scifact_sample), "--top-k", "3"]) == 2
    assert "--top-k: Input should be greater than or equal to 10" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(scifact_sample), "--models", "acme/not-here"]) == 2
    assert "not in the hub cache" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--top-k", "many"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_config_file_errors_name_the_file_and_line(capsys, tmp_path, scifact_sample):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: x\ntop_k: [1,\n")
    assert main(["evaluate", "--config", str(bad_yaml)]) == 2
    out = capsys.readouterr().err
    assert str(bad_yaml) in out and "line" in out
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"data: {scifact_sample}\ntopk: 5\n")
    assert main(["evaluate", "--config", str(unknown)]) == 2
    assert "--topk: Extra inputs are not permitted" in capsys.readouterr().err


def test_options_override_config_file_which_overrides_defaults(tmp_path, scifact_sample):
    from flows.cli.options import build_config

    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"data: {scifact_sample}\ntop_k: 50\nbatch_size: 8\n")
    args = build_parser().parse_args(["evaluate", "--top-k", "20"])
    config = build_config(EvaluateConfig, args, config_file)
    assert config.top_k == 20 and config.batch_size == 8 and str(config.data) == str(scifact_sample)
    assert config.split == EvaluateConfig.model_fields["split"].default


def test_evaluate_runs_the_flow_and_publishes_report(
    prefect_harness, tmp_path, scifact_sample, tiny_bi_encoder, capsys
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    folder = write_beir_subset(scifact_sample, tmp_path / "beir", n_queries=10, n_docs=40)
    output = tmp_path / "report.json"
    code = main(
        ["evaluate", "--data", str(folder), "--models", str(tiny_bi_encoder), "--output", str(output)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "nDCG@10" in out and "BM25" in out
    reports = json.loads(output.read_text())["reports"]
    assert [r["system"] for r in reports] == [str(tiny_bi_encoder), "BM25 (k1=0.9, b=0.4)"]
    assert all(r["n_queries"] == 10 and 0 <= r["metrics"]["nDCG@10"] <= 1 for r in reports)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrieval-evaluation"]))
        )
    assert artifacts and "| BM25 (k1=0.9, b=0.4) |" in artifacts[-1].data
