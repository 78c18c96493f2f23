import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune.hparam_report import plot_trials, trials_markdown
from finetune.hparam_search import SearchSettings, run_search
from finetune.supervised import (
    LOSSES,
    TrainSettings,
    _make_collator,
    _per_dataset_sampler,
    mine_negatives,
    train_supervised,
    training_datasets,
)
from tasks.labelled.eval_set import build_eval_set
from tasks.labelled.readers import LabelledData, read_labelled
from tasks.labelled.splits import positive_pairs, split_no_shared_text

ROOT = Path(__file__).resolve().parents[1]
FAST = {"learning_rate": 1e-3, "batch_size": 16, "epochs": 1, "max_seq_length": 32}
SPACE = {
    "search_learning_rate": [3e-4, 3e-3],
    "search_batch_sizes": [16],
    "search_epochs": [1],
    "search_evaluations": 2,
}


@pytest.fixture(scope="module")
def small_pairs(quora_sample):
    """300 Quora pairs for training and a validation set carved off them with no shared text."""
    data = read_labelled(quora_sample / "train.tsv").subset(slice(0, 300))
    train, validation = split_no_shared_text(data, 0.3, seed=0)
    return train, build_eval_set(validation)


def weights(model_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.parametrize("loss", [*LOSSES, "mnrl-matryoshka"])
def test_each_loss_trains_and_changes_the_weights(tmp_path, tiny_bi_encoder, small_pairs, loss):
    train, _ = small_pairs
    settings = TrainSettings(
        model=str(tiny_bi_encoder),
        loss=loss.removesuffix("-matryoshka"),
        matryoshka_dims=[32, 16] if loss.endswith("matryoshka") else [],
        mini_batch_size=4,
        **FAST,
    )
    result = train_supervised(train, settings, tmp_path / "model", show_progress=False)
    assert result.loss == settings.loss and result.steps > 0 and result.loss_history
    before, after = weights(tiny_bi_encoder), weights(result.model_dir)
    changed = [name for name in before if not np.allclose(before[name], after[name])]
    assert len(changed) > len(before) // 2
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no scratch left behind


def test_groups_and_query_rows_train_with_their_default_losses(tmp_path, tiny_bi_encoder):
    from tasks.core.models import load_sentence_transformer

    texts = [
        f"how do I {verb} my {thing}"
        for verb in ("reset", "change", "recover")
        for thing in ("password", "email")
    ]
    groups = LabelledData(
        "groups",
        pd.DataFrame({"text": texts + [t + "?" for t in texts], "label": list(range(6)) * 2, "line": 0}),
        "mem",
    )
    result = train_supervised(
        groups,
        TrainSettings(model=str(tiny_bi_encoder), **{**FAST, "batch_size": 4}),
        tmp_path / "groups",
        show_progress=False,
    )
    assert result.loss == "batch-hard-triplet" and result.steps > 0
    rows = LabelledData(
        "triplets",
        pd.DataFrame(
            {
                "query": texts,
                "positive": [t + "?" for t in texts],
                "negative": texts[1:] + texts[:1],
                "line": 0,
            }
        ),
        "mem",
    )
    result = train_supervised(
        rows, TrainSettings(model=str(tiny_bi_encoder), **FAST), tmp_path / "rows", show_progress=False
    )
    assert result.loss == "mnrl" and result.rows == 6
    # rows with their own negatives keep them: nothing is mined in their place
    given = training_datasets(
        rows, "mnrl", miner=load_sentence_transformer(tiny_bi_encoder), hard_negatives=2
    )
    assert list(given) == ["mnrl"] and given["mnrl"]["negative"] == texts[1:] + texts[:1]


def test_mined_negatives_are_never_duplicates_and_no_pair_is_lost(tmp_path, tiny_bi_encoder, small_pairs):
    from tasks.core.models import load_sentence_transformer

    train, _ = small_pairs
    table = positive_pairs(train)
    group_of = dict(zip(table["anchor"], table["group"], strict=True))
    group_of.update(zip(table["positive"], table["group"], strict=True))
    mined, unmined = mine_negatives(train, table, load_sentence_transformer(tiny_bi_encoder), 2)
    assert len(mined) > 0 and list(mined.columns) == ["anchor", "positive", "negative", "group"]
    assert (
        not (mined["negative"] == mined["positive"]).any()
        and not (mined["negative"] == mined["anchor"]).any()
    )
    assert not (mined["negative"].map(group_of) == mined["group"]).any()
    assert mined.groupby(["anchor", "positive"]).size().max() <= 2
    pairs = set(zip(table["anchor"], table["positive"], strict=True))
    kept = set(zip(mined["anchor"], mined["positive"], strict=True)) | set(
        zip(unmined["anchor"], unmined["positive"], strict=True)
    )
    assert kept == pairs
    all_texts = set(train.rows["text1"]) | set(train.rows["text2"])
    assert set(mined["negative"]) <= all_texts

    settings = TrainSettings(model=str(tiny_bi_encoder), loss="mnrl", hard_negatives=2, **FAST)
    result = train_supervised(train, settings, tmp_path / "model", show_progress=False)
    assert result.rows == len(mined) + len(unmined) and result.steps > 0 and result.loss_history


def test_in_batch_negatives_are_never_duplicates_of_the_anchor(tiny_bi_encoder):
    import torch
    from datasets import Dataset

    from tasks.core.models import load_sentence_transformer

    # a-b, b-c, c-d are one duplicate group (chained); without the group column a-b and c-d could share a batch
    rows = [(f"q{i}", f"q{i + 1}", 1) for i in range(0, 12)] + [(f"x{i}", f"y{i}", 1) for i in range(12)]
    data = LabelledData(
        "pairs", pd.DataFrame(rows, columns=["text1", "text2", "label"]).assign(line=0), "mem"
    )
    table = positive_pairs(data)
    dataset = Dataset.from_pandas(table, preserve_index=False)
    sampler = _per_dataset_sampler(
        dataset,
        batch_size=4,
        drop_last=False,
        valid_label_columns=["label"],
        generator=torch.Generator(),
        seed=0,
    )
    seen = 0
    for batch in sampler:
        groups = table["group"].iloc[batch].tolist()
        assert len(set(groups)) == len(groups)
        seen += len(batch)
    assert seen >= len(table)
    collated = _make_collator(load_sentence_transformer(tiny_bi_encoder))([dataset[0], dataset[1]])
    assert any(k.startswith("anchor_") for k in collated) and not any(k.startswith("group") for k in collated)


@pytest.mark.slow
def test_two_trial_search_picks_the_best_and_reports(tmp_path, tiny_bi_encoder, small_pairs):
    train, validation = small_pairs
    seen = []
    result = run_search(
        train,
        validation,
        base=TrainSettings(model=str(tiny_bi_encoder), **FAST),
        space=SearchSettings(search=2, search_hard_negatives=[0, 2], **SPACE),
        workdir=tmp_path,
        metric="MRR@10",
        show_progress=False,
        on_trial=seen.append,
    )
    assert [t["state"] for t in result.trials] == ["COMPLETE", "COMPLETE"] and len(seen) == 2
    first = result.trials[0]
    assert (
        first["default"]
        and first["learning_rate"] == FAST["learning_rate"]
        and first["loss"] == "online-contrastive"
        and first["hard_negatives"] == 0
    )
    assert {t["hard_negatives"] for t in result.trials} <= {0, 2}
    assert result.default_trial == 0 and result.best_value >= result.default_value
    assert result.best_value == max(t["value"] for t in result.trials)
    assert result.trials[1]["learning_rate"] != FAST["learning_rate"]
    study_dir = tmp_path / result.study_name
    assert Path(result.best_model_dir).is_dir()
    assert sorted(p.name for p in study_dir.glob("trial-*")) == [f"trial-{result.best_trial:04d}"]
    table = trials_markdown(result)
    assert table.count("\n") == 3 and "(defaults)" in table and "**" in table and "hard negatives" in table
    png = plot_trials(result, study_dir / "trials.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_pruned_trials_stop_early_and_keep_no_model(tmp_path, tiny_bi_encoder, small_pairs):
    import optuna

    class PruneAllButFirst(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number > 0

    train, validation = small_pairs
    space = SearchSettings(search=2, **{**SPACE, "search_evaluations": 3})
    result = run_search(
        train,
        validation,
        base=TrainSettings(model=str(tiny_bi_encoder), **FAST),
        space=space,
        workdir=tmp_path,
        show_progress=False,
        pruner=PruneAllButFirst(),
    )
    complete, pruned = result.trials
    assert complete["state"] == "COMPLETE" and pruned["state"] == "PRUNED"
    assert list(pruned["intermediate"]) == ["1"]  # stopped at its first evaluation
    assert not (tmp_path / result.study_name / "trial-0001").exists()
    assert "(" in trials_markdown(result).splitlines()[-1]  # a pruned trial's last value, in parentheses


@pytest.mark.slow
def test_a_failed_search_resumes_without_rerunning_finished_trials(tmp_path, tiny_bi_encoder, small_pairs):
    from optuna.trial import TrialState
    from transformers import TrainerCallback

    train, validation = small_pairs
    started = []

    class CountAndFail(TrainerCallback):
        def __init__(self, fail_on_trial):
            self.fail_on_trial = fail_on_trial

        def on_train_begin(self, args, state, control, **kwargs):
            started.append(args.output_dir)
            if len(started) - 1 == self.fail_on_trial:
                raise RuntimeError("power cut")

    base = TrainSettings(model=str(tiny_bi_encoder), **FAST)
    space = SearchSettings(search=2, **SPACE)
    with pytest.raises(RuntimeError, match="power cut"):
        run_search(
            train,
            validation,
            base=base,
            space=space,
            workdir=tmp_path,
            show_progress=False,
            callbacks=[CountAndFail(fail_on_trial=1)],
        )
    assert len(started) == 2
    started.clear()
    result = run_search(
        train,
        validation,
        base=base,
        space=space,
        workdir=tmp_path,
        show_progress=False,
        callbacks=[CountAndFail(fail_on_trial=-1)],
    )
    assert len(started) == 1 and result.resumed  # only the cut-off trial ran again
    states = [t["state"] for t in result.trials]
    assert states == [TrialState.COMPLETE.name, TrialState.FAIL.name, TrialState.COMPLETE.name]
    retry = result.trials[2]
    assert retry["retry_of"] == 1 and retry["learning_rate"] == result.trials[1]["learning_rate"]


KILLED_SEARCH = """
import sys, time
sys.path.insert(0, {tests!r})
from tasks import _env
from transformers import TrainerCallback
from finetune.hparam_search import SearchSettings, run_search
from finetune.supervised import TrainSettings
from tasks.labelled.readers import read_labelled
from tasks.labelled.eval_set import build_eval_set
from tasks.labelled.splits import split_no_shared_text

class HangOnSecondTrial(TrainerCallback):
    calls = 0
    def on_train_begin(self, args, state, control, **kwargs):
        HangOnSecondTrial.calls += 1
        if HangOnSecondTrial.calls == 2:
            open({marker!r}, "w").close()
            time.sleep(600)

data = read_labelled({data!r}).subset(slice(0, 300))
train, validation = split_no_shared_text(data, 0.3, seed=0)
run_search(train, build_eval_set(validation), base=TrainSettings(model={model!r}, **{fast!r}),
           space=SearchSettings(search=2, **{space!r}), workdir={workdir!r}, show_progress=False,
           callbacks=[HangOnSecondTrial()])
"""


@pytest.mark.slow
def test_a_killed_search_resumes_and_reruns_only_the_cut_off_trial(
    tmp_path, tiny_bi_encoder, small_pairs, quora_sample
):
    train, validation = small_pairs
    marker = tmp_path / "second-trial-started"
    script = KILLED_SEARCH.format(
        tests=str(ROOT / "tests"),
        marker=str(marker),
        data=str(quora_sample / "train.tsv"),
        model=str(tiny_bi_encoder),
        fast=FAST,
        space=SPACE,
        workdir=str(tmp_path),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    result = run_search(
        train,
        validation,
        base=TrainSettings(model=str(tiny_bi_encoder), **FAST),
        space=SearchSettings(search=2, **SPACE),
        workdir=tmp_path,
        show_progress=False,
    )
    states = [t["state"] for t in result.trials]
    assert states == [
        "COMPLETE",
        "FAIL",
        "COMPLETE",
    ]  # the killed trial was left RUNNING, then failed and retried
    assert result.trials[2]["retry_of"] == 1 and result.resumed
    assert result.trials[2]["learning_rate"] == result.trials[1]["learning_rate"]


def test_search_settings_are_checked():
    with pytest.raises(ValueError, match="unknown loss"):
        SearchSettings(search_loss=["mnrl", "cosine"]).check()
    with pytest.raises(ValueError, match="low then high"):
        SearchSettings(search_learning_rate=[1e-3, 1e-5]).check()
    with pytest.raises(ValueError, match="even numbers"):
        SearchSettings(search_batch_sizes=[3]).check()


def test_training_refuses_to_overwrite_and_reports_bad_matryoshka_sizes(
    tmp_path, tiny_bi_encoder, small_pairs
):
    train, _ = small_pairs
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        train_supervised(
            train, TrainSettings(model=str(tiny_bi_encoder)), tmp_path / "taken", show_progress=False
        )
    with pytest.raises(ValueError, match=r"matryoshka_dims \[64\] exceed the model's embedding size 32"):
        train_supervised(
            train,
            TrainSettings(model=str(tiny_bi_encoder), matryoshka_dims=[64, 16]),
            tmp_path / "m",
            show_progress=False,
        )
    assert not (tmp_path / "m").exists()


def test_search_result_json_round_trip(tmp_path):
    from finetune.hparam_search import SearchResult, load_result, save_result

    result = SearchResult(
        "s",
        "sqlite:///x",
        "MRR@10",
        1,
        0.5,
        {"loss": "mnrl"},
        "/m",
        0,
        0.4,
        trials=[{"number": 0}],
        resumed=True,
    )
    assert load_result(save_result(result, tmp_path / "r.json")) == result
    assert json.loads((tmp_path / "r.json").read_text())["best_params"] == {"loss": "mnrl"}
