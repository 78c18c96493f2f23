"""What hostile input, a full disk, a diverging model and a chatty library do to the product."""

from __future__ import annotations

import errno
import json
import logging
import threading
import time

import numpy as np
import pytest

from flows.cli import main
from tasks.core.registry import Registry

HOSTILE_TITLE = "tumor [/b] growth [link](http://x) <img src=x onerror=alert(1)>|pwn"


@pytest.fixture()
def served(tmp_path, tiny_bi_encoder):
    """A workspace whose current text-retriever serves a corpus with markup in its titles."""
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"_id": "d1", "title": HOSTILE_TITLE, "text": "cells divide and tumors grow"}] + [
        {"_id": f"d{i}", "title": f"plain title {i}", "text": f"some other text number {i}"}
        for i in range(2, 8)
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    registry = Registry(tmp_path / "ws")
    version = registry.register("text-retriever", tiny_bi_encoder, {"corpus": str(corpus)})
    registry.promote("text-retriever", version)
    return tmp_path / "ws"


# ------------------------------------------------------------------ 1. data is never terminal markup


def test_queries_titles_and_paths_print_as_they_are(served, capsys):
    assert main(["search", "tumor [/b] growth", "--top-k", "7", "--workspace", str(served)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "tumor [/b] growth" in out  # the query, in the table's title
    assert "[link](http://x)" in out  # not read as a [link] style

    assert main(["evaluate", "--data", str(served / "run[/1]")]) == 2
    assert "run[/1]" in capsys.readouterr().err


# --------------------------------------------------------------- 2. data is never markdown or HTML


def test_report_markdown_escapes_data():
    from tasks.core.evaluation import EvalReport, markdown_table
    from tasks.core.markdown import md
    from tasks.core.report import examples_markdown

    cell = md("<img src=x onerror=alert(1)>|pwn")
    assert "<img" not in cell and "&lt;img" in cell and "\\|pwn" in cell
    example = {
        "query": "a | b <script>",
        "delta": 0.5,
        "before": [{"title": HOSTILE_TITLE, "doc_id": "d1", "relevant": True}],
        "after": [{"title": "**bold** _it_", "doc_id": "d2", "relevant": False}],
    }
    table = examples_markdown([example])
    row = table.splitlines()[-1]
    assert row.replace("\\|", "").count("|") == 4  # the table keeps its three cells
    assert "<script>" not in row and "<img" not in row and "\\*\\*bold\\*\\*" in row
    from tasks.catalog.pairs import bad_images_markdown
    from tasks.core.corpus import Skipped

    left_out = bad_images_markdown(
        [Skipped(file="c.csv", line=3, doc_id="<img src=x onerror=alert(1)>|pwn", reason="a|b")]
    )
    row = left_out.splitlines()[-1]
    assert "<img" not in row and row.replace("\\|", "").count("|") == 4
    report = EvalReport(
        system="model|<b>x</b>",
        dataset="d",
        n_queries=1,
        n_docs=1,
        metrics={"nDCG@10": 0.5},
        per_query={},
        seconds=1.0,
    )
    line = markdown_table([report], metrics=["nDCG@10"]).splitlines()[-1]
    assert line.replace("\\|", "").count("|") == 4 and "<b>" not in line


# ------------------------------------------------------------- 6. workspace and a full disk


def test_an_unwritable_workspace_stops_at_once(tmp_path, capsys, scifact_sample, prefect_harness):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["evaluate", "--data", str(scifact_sample), "--workspace", str(blocker / "ws")]) == 2
    err = capsys.readouterr().err
    assert "workspace is not writable" in err and str(blocker / "ws") in err


def test_a_full_disk_names_the_stage_and_keeps_finished_work(tmp_path):
    import pyarrow as pa

    from tasks.core.store import Store
    from tasks.core.timing import Stopwatch
    from tasks.core.workspace import DiskFullError

    store = Store(tmp_path / "ws")
    writer = store.open("queries", "k1", config={}, inputs=[], models=[])
    writer.write_part(0, pa.table({"a": [1]}))
    watch = Stopwatch()
    with pytest.raises(DiskFullError) as info, watch.stage("generate queries"):
        raise OSError(errno.ENOSPC, "No space left on device", str(writer.path / "part-00001.parquet"))
    message = str(info.value)
    assert "generate queries" in message and "part-00001.parquet" in message and "MB free" in message
    assert writer.has_part(0) and not writer.has_part(1)  # the finished part is kept, no partial one
    assert not [p for p in writer.path.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------- 7. user errors: one line, exit 2


def test_user_errors_are_one_line_with_exit_2(tmp_path, served, capsys, scifact_sample):
    started = time.time()
    assert main(["search", "   ", "--workspace", str(served)]) == 2
    assert "the query is empty" in capsys.readouterr().err and time.time() - started < 5

    from tasks.core.corpus import DataError, read_qrels

    qrels = tmp_path / "inf.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\tinf\n")
    with pytest.raises(DataError, match=r"inf.tsv, line 3: score 'inf' is not a finite number"):
        read_qrels(qrels)


# --------------------------------------------------------------------- 8. no non-finite number


def test_no_config_takes_a_non_finite_number(capsys, scifact_sample):
    from flows.cli.flow_commands import FLOW_COMMANDS

    assert main(["text", "--corpus", str(scifact_sample), "--train-learning-rate", "inf"]) == 2
    assert "--train-learning-rate: Input should be a finite number" in capsys.readouterr().err
    # every float setting of every flow's config refuses inf and nan
    for _, _, load, _ in FLOW_COMMANDS:
        config = load()
        for section in [
            config,
            *[
                f.annotation
                for f in config.model_fields.values()
                if isinstance(f.annotation, type) and hasattr(f.annotation, "model_config")
            ],
        ]:
            assert section.model_config.get("allow_inf_nan") is False, section.__name__


def test_a_diverging_training_stops_and_saves_nothing(tmp_path, tiny_bi_encoder):
    from finetune.guards import TrainingDivergedError
    from finetune.marginmse import TrainConfig, TrainingRows, train_marginmse, train_query_side
    from tasks.core.models import load_sentence_transformer

    rows = TrainingRows(
        queries=[f"query {i}" for i in range(8)],
        positives=[f"the passage of query {i}" for i in range(8)],
        negatives=[[f"another passage {i}", f"and one more {i}"] for i in range(8)],
        margins=[[float("nan"), 1.0] for _ in range(8)],
    )
    config = TrainConfig(
        max_steps=3,
        batch_size=4,
        logging_steps=1,
        eval_fraction=0.0,
        label_scale=1.0,
        save_steps=10,
        eval_steps=10,
        max_seq_length=32,
    )
    with pytest.raises(TrainingDivergedError, match="nan at step 1"):
        train_query_side(
            str(tiny_bi_encoder),
            rows,
            lambda texts: np.ones((len(texts), 32), np.float32) / 32**0.5,
            config,
            str(tmp_path / "query-side"),
        )
    assert not (tmp_path / "query-side" / "model").exists()
    with pytest.raises(TrainingDivergedError):
        train_marginmse(load_sentence_transformer(str(tiny_bi_encoder)), rows, config, str(tmp_path / "both"))
    assert not (tmp_path / "both" / "model").exists()


# --------------------------------------------------------------------- 9. stdout is the result


def test_errors_go_to_stderr_and_json_stays_clean(tmp_path, served, capsys):
    assert main(["search", "cells", "--json", "--workspace", str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "run `adapt text` first" in captured.err
    assert main(["search", "cells", "--json", "--top-k", "3", "--workspace", str(served)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3  # nothing but the JSON on stdout


# --------------------------------------------------------------------- 10. no long silence


def test_a_waiting_refresh_says_so(tmp_path, caplog):
    from tasks.text.refresh import RefreshLockedError, refresh_lock

    held, release = threading.Event(), threading.Event()

    def first():
        with refresh_lock(tmp_path, timeout=5):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(5)
    caplog.set_level(logging.INFO, logger="tasks")
    with pytest.raises(RefreshLockedError):
        with refresh_lock(tmp_path, timeout=0.5):
            pass
    assert "another refresh of this model holds" in caplog.text and "waiting up to 0.5 s" in caplog.text
    release.set()
    thread.join()


def test_the_first_search_after_a_promotion_says_it_builds_the_index(served, capsys):
    assert main(["search", "cells", "--top-k", "2", "--workspace", str(served)]) == 0
    assert "building the search index of text-retriever v0001" in capsys.readouterr().err


def test_a_rerun_says_what_it_reused(tmp_path, tiny_bi_encoder, caplog, scifact_sample):
    from flows.adapt_text import AdaptTextConfig
    from tasks.core.corpus import read_corpus
    from tasks.core.embeddings import EmbeddingCache
    from tasks.core.models import load_sentence_transformer
    from tasks.core.store import Store
    from tasks.core.timing import Stopwatch
    from tasks.text.pipeline import LabelPipeline

    corpus = read_corpus(scifact_sample / "corpus.jsonl")
    corpus.docs = corpus.docs.head(40).reset_index(drop=True)
    settings = AdaptTextConfig(corpus=scifact_sample, qgen={"part_size": 16}, mine={"max_seq_length": 32})
    cache = EmbeddingCache(
        tmp_path, load_sentence_transformer(str(tiny_bi_encoder)), "tiny", max_seq_length=32
    )

    def run():
        pipeline = LabelPipeline(corpus, cache, Store(tmp_path), "tiny", settings, watch=Stopwatch())
        return pipeline.queries()

    run()
    caplog.set_level(logging.INFO, logger="tasks")
    ref, _ = run()
    parts = len(ref.manifest["parts"])
    assert f"generate queries: reused {parts} of {parts} parts" in caplog.text
    assert "encode corpus: reused" in caplog.text


# ------------------------------------------------------------------------ 11. no library noise


def test_training_prints_no_trainer_dicts(tmp_path, tiny_bi_encoder, capsys):
    from finetune.supervised import TrainSettings, train_supervised
    from tasks.labelled.readers import read_labelled

    data_file = tmp_path / "pairs.tsv"
    data_file.write_text(
        "text1\ttext2\tlabel\n"
        + "".join(f"question number {i}\tquestion {i} again\t{i % 2}\n" for i in range(24))
    )
    settings = TrainSettings(model=str(tiny_bi_encoder), epochs=1, batch_size=8, max_seq_length=32)
    train_supervised(read_labelled(data_file), settings, str(tmp_path / "model"), show_progress=True)
    out = capsys.readouterr().out
    assert "{'loss'" not in out and "'train_runtime'" not in out


def test_export_raises_no_tracer_warning(tmp_path, tiny_bi_encoder, recwarn):
    import torch

    from tasks.core.onnx import export_onnx

    export_onnx(tiny_bi_encoder, tmp_path / "onnx", min_cosine=0.9)
    assert not [w for w in recwarn if issubclass(w.category, torch.jit.TracerWarning)]
