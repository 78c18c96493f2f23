import json

import numpy as np
import pytest

from finetune.clip.config import ClipTrainConfig
from flows.adapt_clip import ClipConfig
from flows.cli import main
from tasks.catalog.encoders import load_catalog_encoder
from tasks.catalog.evaluation import catalog_eval_set, evaluate_catalog_encoder
from tasks.catalog.pairs import build_pairs
from tasks.core.products import read_catalog
from tasks.core.registry import Registry

TINY = [
    "--train-epochs",
    "2",
    "--train-batch-size",
    "64",
    "--train-tower-width",
    "8",
    "--train-tower-blocks",
    "1",
    "1",
]


def test_clip_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["clip", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, field in ClipConfig.model_fields.items():
        if name == "train":
            continue
        assert "--" + name.replace("_", "-") in text
        assert " ".join(field.description.split()[:3]) in text
    for name, field in ClipTrainConfig.model_fields.items():
        assert "--train-" + name.replace("_", "-") in text
        assert " ".join(field.description.split()[:3]) in text


def test_clip_bad_arguments_get_a_clear_message_and_exit_2(prefect_harness, capsys, tmp_path, fashion_sample):
    catalog = str(fashion_sample / "styles.csv")
    assert main(["clip", "--catalog", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: file not found" in capsys.readouterr().err
    assert main(["clip", "--catalog", catalog, "--caption-template", "{colour} {articleType}"]) == 2
    assert "line 2: no column(s) ['colour']" in " ".join(capsys.readouterr().err.split())
    assert main(["clip", "--catalog", catalog, "--heldout-fraction", "1.5"]) == 2
    assert "--heldout-fraction: Input should be less than 1" in capsys.readouterr().err
    assert main(["clip", "--catalog", catalog, "--train-wise-ft-ratio", "2"]) == 2
    assert "--train-wise-ft-ratio: Input should be less than or equal to 1" in capsys.readouterr().err
    assert main(["clip", "--catalog", catalog, "--model", "acme/not-here"]) == 2
    assert "not in the hub cache" in capsys.readouterr().err
    assert main(["clip", "--catalog", catalog, "--model", str(fashion_sample)]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["clip"]) == 2
    assert "--catalog: Field required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["clip", "--catalog", catalog, "--train-epochs", "many"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@pytest.mark.slow
def test_clip_flow_trains_reports_registers_and_gates_promotion(
    prefect_harness, tmp_path, fashion_sample, capsys
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    workspace = tmp_path / "ws"
    args = [
        "clip",
        "--catalog",
        str(fashion_sample / "styles.csv"),
        "--workspace",
        str(workspace),
        "--showcase-queries",
        "navy blue men shirt",
        *TINY,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "attribute_ndcg@10" in out and "caption_recall@10" in out and "registry: v0001" in out

    reports = sorted((workspace / "reports").glob("adapt-clip-*"))
    assert len(reports) == 1
    before = json.loads((reports[0] / "before.json").read_text())
    after = json.loads((reports[0] / "after.json").read_text())
    assert before["n_products"] == after["n_products"] > 50  # ~20% of the 400 products, held out
    assert "near random" in before["notes"]
    assert len(after["showcase_hits"]["navy blue men shirt"]) == 10
    grid = reports[0] / "top-images.png"
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and grid.stat().st_size > 10_000
    markdown = (reports[0] / "report.md").read_text()
    assert "| attribute_ndcg@10 |" in markdown and "top-images.png" in markdown and "## Timings" in markdown

    registry = Registry(workspace)
    card = registry.card("catalog-clip", "v0001")
    new, old = card["metrics_after"]["attribute_ndcg@10"], card["metrics_before"]["attribute_ndcg@10"]
    # the gate follows the held-out metric: it compared exactly these two numbers
    assert (registry.current("catalog-clip") == "v0001") == (new > old)
    last = registry.history("catalog-clip")[-1]
    assert last["event"] == ("promoted" if new > old else "rejected")
    assert f"{new:.4f}" in last["reason"] and f"{old:.4f}" in last["reason"]

    # the registered model loads back and reproduces the flow's held-out numbers
    pairs = build_pairs(read_catalog(fashion_sample / "styles.csv"), show_progress=False)
    from tasks.catalog.pairs import split_pairs

    _, held_out = split_pairs(pairs, 0.2)
    encoder = load_catalog_encoder(registry.path("catalog-clip", "v0001"))
    again = evaluate_catalog_encoder(
        encoder, catalog_eval_set(held_out), system="reloaded", show_progress=False
    )
    for name, value in after["metrics"].items():
        assert again.metrics[name] == pytest.approx(value, abs=1e-6), name
    trained = load_catalog_encoder(after["model"])  # the flow's own output directory
    assert np.allclose(trained.encode_images(held_out.pixels[:8]), encoder.encode_images(held_out.pixels[:8]))

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["catalog-clip-report"]))
        )
    assert artifacts and "| caption_recall@10 |" in artifacts[-1].data

    # same catalog, same settings: training is reused, and the same model is never promoted over itself
    current = registry.current("catalog-clip")
    assert main(args) == 0
    assert "registry: v0002: not promoted" in " ".join(capsys.readouterr().out.split())
    assert registry.current("catalog-clip") == current
    reports = sorted((workspace / "reports").glob("adapt-clip-*"))
    assert json.loads((reports[-1] / "after.json").read_text())["metrics"] == after["metrics"]


def test_the_deployment_entry_points_at_the_flow_with_valid_parameters():
    from pathlib import Path

    import yaml
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    deployments = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]
    (entry,) = [d for d in deployments if d["name"] == "adapt-clip"]
    assert entry["work_pool"]["name"] == "local-process"
    assert entry["work_pool"]["job_variables"]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    flow = load_flow_from_entrypoint(str(root / entry["entrypoint"]))
    assert flow.name == "adapt-clip"
    config = ClipConfig.model_validate(entry["parameters"]["config"])
    assert (root / config.catalog).is_file()
