"""Training on several processes: the entry point of each process under ``torchrun``, and its launch.

Start it with ``torchrun`` (one machine, N CPU processes over gloo)::

    torchrun --standalone --nproc-per-node 2 -m finetune.launch marginmse \\
        --base-model DIR --rows rows.parquet --config train.json --output-dir DIR
    torchrun --standalone --nproc-per-node 2 -m finetune.launch clip \\
        --model DIR --pairs PAIRS_DIR --config clip.json --heldout-fraction 0.15 --image-size 80 60 --workspace WS
    torchrun --standalone --nproc-per-node 2 -m finetune.launch supervised \\
        --prepared prepared.json --split train --settings settings.json --output-dir MODEL --result result.json

or from a flow with ``--train-processes N`` (``adapt text --method marginmse``, ``adapt clip``,
``adapt supervised``), which runs exactly these commands and reads the result back. Checkpoints and
resume work as with one process: rank 0 writes them, every process reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.distributed import ensure_process_group, is_main
from tasks import _env  # noqa: F401


def torchrun_command(processes: int, *arguments: str) -> list[str]:
    """The command that runs ``python -m finetune.launch ARGUMENTS`` on ``processes`` processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "finetune.launch",
        *arguments,
    ]


def launch(processes: int, *arguments: str, log_file: Path) -> None:
    """Run the training on ``processes`` processes and wait; its output goes to ``log_file``. A failed
    run raises with the end of that log (the first failing process's traceback is in it)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as out:
        code = subprocess.run(
            torchrun_command(processes, *arguments), stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(
            f"training on {processes} processes failed (exit code {code}); {log_file}:\n{tail}"
        )


def marginmse_on_processes(
    base_model: str, rows: Any, config: Any, output_dir: str | Path, processes: int
) -> Any:
    """:func:`finetune.marginmse.train_marginmse` on ``processes`` processes: the rows and settings go
    to ``output_dir`` as files, each process trains on its share of every step, and the result is read
    back (a finished run in ``output_dir`` is reused; a cut-off one resumes from its checkpoint)."""
    import pandas as pd

    from finetune.marginmse import finished_run
    from tasks.core.store import write_parquet_atomic, write_text_atomic

    output_dir = Path(output_dir)
    if (finished := finished_run(output_dir)) is not None:
        return finished
    table = pd.DataFrame(
        {
            "query": rows.queries,
            "positive": rows.positives,
            "negatives": rows.negatives,
            "margins": rows.margins,
        }
    )
    import pyarrow as pa

    write_parquet_atomic(output_dir / "rows.parquet", pa.Table.from_pandas(table, preserve_index=False))
    write_text_atomic(output_dir / "train-config.json", config.model_dump_json())
    launch(
        processes,
        "marginmse",
        "--base-model",
        str(base_model),
        "--rows",
        str(output_dir / "rows.parquet"),
        "--config",
        str(output_dir / "train-config.json"),
        "--output-dir",
        str(output_dir),
        log_file=output_dir / "torchrun.log",
    )
    result = finished_run(output_dir)
    if result is None:
        raise RuntimeError(f"training on {processes} processes ended without a model in {output_dir}")
    return result


def clip_on_processes(model: str, pairs_path: str, config: Any, processes: int, **settings: Any) -> dict:
    """:func:`finetune.clip.stage.train_stage` on ``processes`` processes, then its summary (read back
    from the stage: a finished stage is reused as with one process)."""
    from finetune.clip.stage import train_stage
    from tasks.core.store import write_text_atomic

    workspace = Path(settings["workspace"])
    folder = workspace / "clip-train" / f"launch-{os.getpid()}"
    write_text_atomic(folder / "config.json", config.model_dump_json())
    launch(
        processes,
        "clip",
        "--model",
        str(model),
        "--pairs",
        str(pairs_path),
        "--config",
        str(folder / "config.json"),
        "--heldout-fraction",
        str(settings["heldout_fraction"]),
        "--split-salt",
        str(settings.get("split_salt", "holdout")),
        "--image-size",
        *[str(v) for v in settings["image_size"]],
        "--workspace",
        str(workspace),
        log_file=folder / "torchrun.log",
    )
    return {**train_stage(model, pairs_path, config, **settings), "reused": False, "processes": processes}


def supervised_on_processes(
    prepared: Any, settings: Any, output_dir: str | Path, split: str, processes: int
) -> dict:
    """:func:`finetune.supervised.train_supervised` of one prepared split on ``processes`` processes;
    returns the run's result (as ``TrainResult.to_dict()``)."""
    import dataclasses

    from tasks.core.store import write_json_atomic, write_text_atomic

    output_dir = Path(output_dir)
    folder = output_dir.with_name(f".{output_dir.name}.launch")
    write_json_atomic(folder / "prepared.json", dataclasses.asdict(prepared))
    write_text_atomic(folder / "settings.json", settings.model_dump_json())
    launch(
        processes,
        "supervised",
        "--prepared",
        str(folder / "prepared.json"),
        "--split",
        split,
        "--settings",
        str(folder / "settings.json"),
        "--output-dir",
        str(output_dir),
        "--result",
        str(folder / "result.json"),
        log_file=folder / "torchrun.log",
    )
    return {**json.loads((folder / "result.json").read_text()), "processes": processes}


# ------------------------------------------------------------------ the entry point of each process


def _marginmse(args: argparse.Namespace) -> None:
    import pandas as pd

    from finetune.marginmse import TrainConfig, TrainingRows, train_marginmse

    rows = TrainingRows.from_table(pd.read_parquet(args.rows))
    config = TrainConfig.model_validate_json(Path(args.config).read_text())
    result = train_marginmse(args.base_model, rows, config, args.output_dir)
    if is_main():
        print(json.dumps({"steps": result.steps, "model_dir": str(result.model_dir)}))


def _clip(args: argparse.Namespace) -> None:
    from finetune.clip.config import ClipTrainConfig
    from finetune.clip.stage import train_stage

    config = ClipTrainConfig.model_validate_json(Path(args.config).read_text())
    summary = train_stage(
        args.model,
        args.pairs,
        config,
        heldout_fraction=args.heldout_fraction,
        split_salt=args.split_salt,
        image_size=tuple(args.image_size),
        workspace=args.workspace,
        show_progress=False,
    )
    if is_main():
        print(json.dumps({k: summary[k] for k in ("model_dir", "key", "reused")}))


def _supervised(args: argparse.Namespace) -> None:
    from finetune.supervised import TrainSettings, train_supervised
    from tasks.core.store import write_json_atomic
    from tasks.labelled.splits import PreparedData

    prepared = PreparedData(**json.loads(Path(args.prepared).read_text()))
    settings = TrainSettings.model_validate_json(Path(args.settings).read_text())
    result = train_supervised(prepared.load(args.split), settings, args.output_dir, show_progress=False)
    if is_main():
        write_json_atomic(Path(args.result), result.to_dict())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.launch",
        description="One process of a training run on several processes (start it with torchrun).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    margin = commands.add_parser(
        "marginmse", help="MarginMSE on both sides (sentence-transformers' trainer, DDP)"
    )
    margin.add_argument("--base-model", required=True, help="the model to train: a directory or name")
    margin.add_argument("--rows", required=True, help="Parquet: query, positive, negatives, margins")
    margin.add_argument("--config", required=True, help="JSON of the MarginMSE settings (TrainConfig)")
    margin.add_argument("--output-dir", required=True, help="checkpoints/ and model/ go here")
    clip = commands.add_parser("clip", help="image/text training of a catalog encoder (CLIP or LiT)")
    clip.add_argument("--model", required=True, help="the start model: a directory or name")
    clip.add_argument("--pairs", required=True, help="a committed pairs stage (its folder)")
    clip.add_argument("--config", required=True, help="JSON of the training settings (ClipTrainConfig)")
    clip.add_argument("--heldout-fraction", type=float, required=True, help="products held out from training")
    clip.add_argument("--split-salt", default="holdout", help="salt of the held-out split")
    clip.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("HEIGHT", "WIDTH"))
    clip.add_argument("--workspace", required=True, help="the flow's workspace (the stage is keyed there)")
    supervised = commands.add_parser("supervised", help="supervised fine-tuning of a prepared split (DDP)")
    supervised.add_argument("--prepared", required=True, help="JSON of the prepared splits (PreparedData)")
    supervised.add_argument(
        "--split", default="train", help="which split to train on (train, train+validation)"
    )
    supervised.add_argument("--settings", required=True, help="JSON of the training settings (TrainSettings)")
    supervised.add_argument("--output-dir", required=True, help="the model is saved here (must not exist)")
    supervised.add_argument("--result", required=True, help="the run's result is written here as JSON")
    args = parser.parse_args(argv)
    ensure_process_group()
    {"marginmse": _marginmse, "clip": _clip, "supervised": _supervised}[args.command](args)
    import torch.distributed as dist

    if dist.is_initialized():  # every process done (rank 0 has written), then leave the group together
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: a trainer's or gloo's background thread still
    joinable at exit aborts the process (SIGABRT, measured here), and torchrun then kills the others
    and reports a failed run although every result is written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
