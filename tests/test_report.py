from PIL import Image

from tasks.core.evaluation import MEASURES, EvalReport
from tasks.core.report import (
    before_after_markdown,
    example_matches,
    examples_markdown,
    plot_series,
    timings_markdown,
)


def report(name, ndcg, hits):
    per_query = {m: dict(ndcg) for m in MEASURES}
    metrics = {m: sum(ndcg.values()) / len(ndcg) for m in MEASURES}
    return EvalReport(name, "d", len(ndcg), 3, metrics, per_query, top_hits=hits)


def test_before_after_examples_and_timings(tmp_path):
    before = report(
        "base", {"q1": 0.0, "q2": 1.0, "q3": 0.5}, {"q1": ["d2", "d1"], "q2": ["d3"], "q3": ["d1"]}
    )
    after = report(
        "tuned", {"q1": 1.0, "q2": 0.5, "q3": 0.5}, {"q1": ["d1", "d2"], "q2": ["d2", "d3"], "q3": ["d1"]}
    )
    table = before_after_markdown(before, after)
    assert "| nDCG@10 | 0.5000 | 0.6667 | +0.1667 |" in table
    assert "1 improved, 1 worsened, 1 unchanged (of 3)" in table
    examples = example_matches(
        before,
        after,
        {"q1": "first?", "q2": "second?"},
        {"d1": "Doc one", "d2": "Doc two", "d3": "Doc three"},
        {"q1": {"d1": 1}, "q2": {"d3": 1}},
        n=2,
        k=2,
    )
    assert [e["query_id"] for e in examples] == ["q1", "q2"]
    assert examples[0]["after"][0] == {"doc_id": "d1", "title": "Doc one", "relevant": True}
    assert examples[0]["before"][0]["relevant"] is False
    markdown = examples_markdown(examples)
    assert "first? (+1.00)" in markdown and "✅ Doc one" in markdown
    assert "| encode | 10.0 | 50 | 5.0 |" in timings_markdown({"encode": {"seconds": 10, "items": 50}})


def test_plot_series_writes_a_png(tmp_path):
    path = plot_series(
        {"train": [(1, 2.0), (2, 1.0)], "eval": [(2, 1.5)]},
        tmp_path / "loss.png",
        title="loss",
        xlabel="step",
        ylabel="loss",
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (700, 400)
