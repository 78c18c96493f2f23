"""The Prefect tasks of every stage: thin wrappers over the plain functions in ``tasks/`` and
``finetune/``, so each stage runs as a task (retries, logs, the UI's task list) inside a flow, and
stays callable without Prefect everywhere else.

A task here owns no logic: it names the stage and, for the long ones, passes a progress callback
that reports through the run logger and a Prefect progress artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.catalog.report import evaluate_catalog_model, publish_catalog_report
from tasks.core.corpus import read_beir
from tasks.core.evaluation import evaluate_bm25, evaluate_model
from tasks.labelled.evaluation import evaluate_prepared
from tasks.labelled.splits import prepare_labelled

read_beir_task = task(read_beir, name="read-beir", task_run_name="read {folder} [{split}]")
evaluate_model_task = task(evaluate_model, name="evaluate-model", task_run_name="evaluate {model_name}")
evaluate_bm25_task = task(evaluate_bm25, name="evaluate-bm25")
prepare_labelled_task = task(prepare_labelled, name="prepare-labelled")
evaluate_prepared_task = task(evaluate_prepared, name="evaluate-labelled", task_run_name="evaluate {system}")
evaluate_catalog_model_task = task(
    evaluate_catalog_model, name="evaluate-catalog-model", task_run_name="evaluate {system}"
)
publish_catalog_report_task = task(publish_catalog_report, name="catalog-report")


def progress_reporter(logger):
    """``progress(label)`` -> a ``(done, total)`` callback: a log line and a Prefect progress artifact
    every ~10% of a long stage."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    def progress(label: str):
        state: dict[str, Any] = {"last": -1, "artifact": None}

        def report(done: int, total: int) -> None:
            step = int(10 * done / max(total, 1))
            if step == state["last"]:
                return
            state["last"] = step
            logger.info("%s: %d/%d", label, done, total)
            percent = round(100.0 * done / max(total, 1), 1)
            try:
                if state["artifact"] is None:
                    state["artifact"] = create_progress_artifact(progress=percent, description=label)
                else:
                    update_progress_artifact(artifact_id=state["artifact"], progress=percent)
            except Exception as exc:  # progress display must never stop the work
                logger.debug("progress artifact not updated: %s", exc)

        return report

    return progress


@task(name="train-marginmse", task_run_name="train {model_name}")
def train_marginmse_task(
    model_name: str, base_path: str, rows, config, output_dir: str, student_margins=None
):
    """MarginMSE training of the whole bi-encoder (:func:`finetune.marginmse.train_marginmse`)."""
    from finetune.marginmse import train_marginmse
    from tasks.core.models import load_sentence_transformer

    if config.processes > 1:  # torchrun: the processes fit the label scale themselves
        from finetune.launch import marginmse_on_processes

        get_run_logger().info("training on %d processes (torchrun, gloo)", config.processes)
        return marginmse_on_processes(base_path, rows, config, output_dir, config.processes)
    progress = progress_reporter(get_run_logger())
    return train_marginmse(
        load_sentence_transformer(base_path),
        rows,
        config,
        output_dir,
        student_margins=student_margins,
        progress=progress("training steps"),
    )


@task(name="train-query-side", task_run_name="train the query side of {base_path}")
def train_query_side_task(base_path: str, rows, doc_cache, config, output_dir: str, student_margins=None):
    """MarginMSE training of the query side against cached document embeddings
    (:func:`finetune.marginmse.train_query_side`)."""
    from finetune.marginmse import train_query_side

    progress = progress_reporter(get_run_logger())
    return train_query_side(
        base_path,
        rows,
        lambda texts: doc_cache.embed(list(texts)),
        config,
        output_dir,
        student_margins=student_margins,
        progress=progress("training steps"),
    )


@task(name="train-listwise", task_run_name="train the query side of {model_name} (listwise)")
def train_listwise_task(model_name: str, base_path: str, lists, document_vectors, config, output_dir: str):
    """Listwise distillation of the query side over fixed document embeddings
    (:func:`finetune.listwise.train_listwise`)."""
    from finetune.listwise import train_listwise

    progress = progress_reporter(get_run_logger())
    return train_listwise(
        base_path, lists, document_vectors, config, output_dir, progress=progress("training steps")
    )


def train_query_side(
    watch,
    *,
    key_name: str,
    inputs: list[str],
    model_name: str,
    start,
    lists,
    document_vectors,
    settings,
    workspace,
):
    """The listwise training stage of a flow: keyed by ``key_name``, the settings, ``inputs`` and the
    start model's fingerprint (a finished run is read back, a cut-off one resumes), run and timed as
    the ``train`` stage of ``watch``, its items the training queries seen."""
    from tasks.core.store import stage_key

    key = stage_key(key_name, settings.model_dump(mode="json"), inputs=inputs, models=[start.fingerprint])
    result = watch.run(
        "train",
        len(lists),
        train_listwise_task,
        model_name,
        str(start.path),
        lists,
        document_vectors,
        settings,
        str(Path(workspace) / "train" / key),
    )
    watch.stages["train"]["items"] = result.steps * settings.batch_size
    return result


@task(name="train-catalog-encoder", task_run_name="train from {model}")
def train_catalog_encoder_task(model: str, pairs_path: str, config, **settings) -> dict:
    """Image/text training on a catalog's pairs (:func:`finetune.clip.stage.train_stage`), the loss
    logged every ``checkpoint_every`` steps."""
    from finetune.clip.stage import train_stage

    logger = get_run_logger()
    every = max(1, config.checkpoint_every)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            logger.info("step %d: loss %.4f", step, loss)

    if config.processes > 1:
        from finetune.launch import clip_on_processes

        logger.info("training on %d processes (torchrun, gloo)", config.processes)
        return clip_on_processes(model, pairs_path, config, config.processes, **settings)
    return train_stage(model, pairs_path, config, on_step=on_step, **settings)


# Supervised training and search take and return paths and small metadata; the rows are read from
# the prepared Parquet files (a :class:`tasks.labelled.splits.PreparedData`).


@task(name="train-supervised", task_run_name="train {settings.model}")
def train_supervised_task(prepared, settings, output_dir: str, split: str = "train") -> dict[str, Any]:
    """Supervised fine-tuning on one prepared split (:func:`finetune.supervised.train_supervised`)."""
    from finetune.supervised import train_supervised

    if settings.train_processes > 1:
        from finetune.launch import supervised_on_processes

        get_run_logger().info("training on %d processes (torchrun, gloo)", settings.train_processes)
        return supervised_on_processes(prepared, settings, output_dir, split, settings.train_processes)
    return train_supervised(prepared.load(split), settings, output_dir).to_dict()


@task(name="search-supervised")
def search_supervised_task(prepared, base, space, workdir: str, metric: str) -> dict:
    """The Optuna search (:func:`finetune.hparam_search.run_search`), scored on the validation split;
    saves its result and a plot of the trials next to the study."""
    from finetune.hparam_report import plot_trials
    from finetune.hparam_search import run_search, save_result
    from tasks.labelled.eval_set import build_eval_set

    validation = build_eval_set(prepared.load("validation"), seed=base.seed)
    result = run_search(
        prepared.load("train"), validation, base=base, space=space, workdir=workdir, metric=metric
    )
    study_dir = Path(workdir) / result.study_name
    save_result(result, study_dir / "result.json")
    plot = plot_trials(result, study_dir / "trials.png")
    return {**result.to_dict(), "plot": str(plot), "study_dir": str(study_dir)}
