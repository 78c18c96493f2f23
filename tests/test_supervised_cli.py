import json

import pytest

from flows.cli import main
from flows.supervised import SupervisedConfig


def subset(source, target, rows):
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return target


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["supervised", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, field in SupervisedConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(field.description.split()[:3]) in text


def test_bad_arguments_get_a_clear_message_and_exit_2(prefect_harness, capsys, tmp_path, quora_sample):
    train = str(quora_sample / "train.tsv")
    with pytest.raises(SystemExit) as info:
        main(["supervised", "--train", train, "--loss", "cosine"])
    assert info.value.code == 2 and "invalid choice: 'cosine'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["supervised", "--train", train, "--search", "many"])
    assert info.value.code == 2 and "invalid int value" in capsys.readouterr().err
    assert main(["supervised"]) == 2
    assert "--train: Field required" in capsys.readouterr().err
    assert main(["supervised", "--train", str(tmp_path / "none.tsv")]) == 2
    assert "none.tsv: file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("is_duplicate\tquestion1\tquestion2\n1\ta\tb\n3\tc\td\n")
    assert main(["supervised", "--train", str(bad)]) == 2
    assert "bad.tsv, line 3: field 'is_duplicate' is '3'; expected a label 0 or 1" in capsys.readouterr().err
    groups = tmp_path / "groups.csv"
    groups.write_text("text,label\na,1\nb,1\n")
    assert main(["supervised", "--train", train, "--eval", str(groups)]) == 2
    assert "holds groups" in capsys.readouterr().err
    assert main(["supervised", "--train", train, "--search", "2", "--search-loss", "cosine"]) == 2
    assert "unknown loss(es) ['cosine']" in capsys.readouterr().err
    assert main(["supervised", "--train", train, "--eval-fraction", "1.5"]) == 2
    assert "--eval-fraction: Input should be less than 1" in capsys.readouterr().err
    assert main(["supervised", "--train", train, "--search-models", "acme/not-here"]) == 2
    assert "not in the hub cache" in capsys.readouterr().err


@pytest.mark.slow
def test_supervised_flow_with_search_registers_and_publishes(
    prefect_harness, tmp_path, quora_sample, tiny_bi_encoder, capsys
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.core.registry import Registry

    train = subset(quora_sample / "train.tsv", tmp_path / "train.tsv", 300)
    evaluation = subset(quora_sample / "test.tsv", tmp_path / "test.tsv", 200)
    workspace = tmp_path / "ws"
    output = tmp_path / "report.json"
    code = main(
        [
            "supervised",
            "--train",
            str(train),
            "--eval",
            str(evaluation),
            "--model",
            str(tiny_bi_encoder),
            "--learning-rate",
            "1e-3",
            "--batch-size",
            "16",
            "--max-seq-length",
            "32",
            "--search",
            "2",
            "--search-learning-rate",
            "3e-4",
            "3e-3",
            "--search-batch-sizes",
            "16",
            "--search-epochs",
            "1",
            "--search-evaluations",
            "2",
            "--metric",
            "MRR@10",
            "--workspace",
            str(workspace),
            "--output",
            str(output),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "pair AP" in out and "MRR@10" in out
    report = json.loads(output.read_text())
    assert report["kind"] == "pairs" and report["rows"]["eval"] == 200
    assert report["rows"]["train"] + report["rows"]["validation"] == 300
    assert len(report["search"]["trials"]) == 2 and report["search"]["trials"][0]["default"]
    assert (
        set(report["metrics_after"]) == set(report["metrics_before"]) and "pair F1" in report["metrics_after"]
    )
    registry = Registry(workspace)
    card = registry.card("supervised", report["version"])
    assert card["metrics_after"]["MRR@10"] == report["metrics_after"]["MRR@10"]
    assert card["search"]["best_params"] == report["search"]["best_params"]
    # the gate compared the reported scores: the base model's and the new one's on --metric
    new, old = report["metrics_after"]["MRR@10"], report["metrics_before"]["MRR@10"]
    assert report["promoted"] == (new > old)
    assert f"{new:.4f}" in report["decision"] and f"{old:.4f}" in report["decision"]
    assert (registry.current("supervised") == report["version"]) == report["promoted"]
    assert registry.history("supervised")[-1]["event"] == ("promoted" if report["promoted"] else "rejected")
    with get_client(sync_client=True) as client:
        artifacts = {
            key: client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            for key in ("supervised-report", "supervised-search-trials")
        }
    # this run's report (other tests of the session publish under the same key)
    (text,) = [a.data for a in artifacts["supervised-report"] if str(train) in a.data]
    assert "Pair classification" in text and "Example matches" in text and "| 0 (defaults) |" in text
    assert "| 1 |" in artifacts["supervised-search-trials"][-1].data
