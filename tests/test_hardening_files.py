"""Files the product writes: with the modes the user's umask gives (not mkstemp's 0600), and nothing
left behind by a failed operation (a model's registry folder and lock, a trial's staging folder)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
import time

import pyarrow as pa
import pytest

from flows.cli import main
from tasks.core.registry import Registry
from tasks.core.store import Store, file_lock, write_json_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_and_stage_outputs_follow_the_umask(tmp_path, umask):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    write_json_atomic(tmp_path / "reports" / "report.json", {"a": 1})
    write_text_atomic(tmp_path / "reports" / "report.md", "# report\n")
    assert _mode(tmp_path / "reports" / "report.json") == file_mode
    assert _mode(tmp_path / "reports" / "report.md") == file_mode

    writer = Store(tmp_path / "ws").open("labels", "k1")
    writer.write_part(0, pa.table({"x": [1, 2]}))
    writer.write_file("pixels.npy", lambda tmp: tmp.write_bytes(b"\x93NUMPY"))
    ref = writer.commit()
    for name in ("part-00000.parquet", "_COMPLETE", "pixels.npy"):
        assert _mode(ref.path / name) == file_mode, name
    assert _mode(ref.path) == dir_mode and _mode(ref.path.parent) == dir_mode
    assert not [p.name for p in ref.path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_registered_model_is_readable_as_the_umask_says_whatever_the_source_modes(tmp_path, umask):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    source = tmp_path / "trained"
    (source / "1_Pooling").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "1_Pooling" / "config.json").write_text("{}")
    for path in (source / "config.json", source / "model.safetensors", source / "1_Pooling" / "config.json"):
        path.chmod(0o600)  # as a trainer's private staging files may be
    for folder in (source, source / "1_Pooling"):
        folder.chmod(0o700)  # tempfile.mkdtemp's mode

    registry = Registry(tmp_path / "ws")
    version = registry.register("m", source, {"base_model": "x"})
    registry.promote("m", version)
    target = registry.path("m", version)
    files = sorted(p for p in target.rglob("*") if p.is_file())
    assert [p.relative_to(target).as_posix() for p in files] == [
        "1_Pooling/config.json",
        "card.json",
        "config.json",
        "model.safetensors",
    ]
    assert {p.relative_to(target).as_posix(): _mode(p) for p in files} == {
        p.relative_to(target).as_posix(): file_mode for p in files
    }
    assert _mode(target) == dir_mode and _mode(target / "1_Pooling") == dir_mode
    assert _mode(tmp_path / "ws" / "models" / "m") == dir_mode
    for name in ("current", "history.jsonl"):
        assert _mode(tmp_path / "ws" / "models" / "m" / name) == file_mode
    assert (target / "model.safetensors").read_bytes() == b"weights"


def _model_dir(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text("w")
    return folder


def test_promoting_or_rolling_back_a_missing_model_leaves_no_folder(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["models", "promote", "nosuch", "v0001", "--workspace", str(ws)]) == 2
    assert not (ws / "models" / "nosuch").exists()
    said = capsys.readouterr()
    assert "'nosuch' is not registered" in said.out + said.err

    Registry(ws).register("m", _model_dir(tmp_path, "a"), {})
    for argv in (["promote", "nosuch", "v0001"], ["rollback", "nosuch"], ["show", "nosuch"]):
        assert main(["models", *argv, "--workspace", str(ws)]) == 2
        assert not (ws / "models" / "nosuch").exists(), argv
    # a missing version of a model that exists keeps that model's folder as it was
    assert main(["models", "promote", "m", "v0009", "--workspace", str(ws)]) == 2
    assert sorted(p.name for p in (ws / "models").iterdir()) == ["m"]
    assert Registry(ws).versions("m") == ["v0001"]


def test_a_failed_first_registration_removes_what_it_made(tmp_path):
    source = _model_dir(tmp_path, "broken")
    (source / "tokenizer.json").symlink_to(tmp_path / "gone.json")  # a dangling link: the copy fails
    ws = tmp_path / "ws"
    with pytest.raises(OSError):
        Registry(ws).register("new-model", source, {})
    assert not (ws / "models" / "new-model").exists()
    assert not (ws / "models").exists()


def test_a_lock_file_removed_by_its_holder_is_never_held_twice(tmp_path):
    path = tmp_path / "m" / ".lock"
    b_in = threading.Event()

    def waiter():
        with file_lock(path, 10, lambda: TimeoutError("b")):
            b_in.set()

    with contextlib.ExitStack() as held:
        held.enter_context(file_lock(path, 1, lambda: TimeoutError("a")))
        b = threading.Thread(target=waiter)
        b.start()
        time.sleep(0.5)  # b waits on the lock file a holds
        # a removes its lock file before letting go (as a failed first registration does), and c
        # locks the new file at that path at once
        fresh = path.with_name(".lock.new")
        c = fresh.open("a")
        fcntl.flock(c, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(fresh, path)
    time.sleep(0.8)  # a let go: b must not now hold the old file's lock while c holds the path's
    assert not b_in.is_set()
    fcntl.flock(c, fcntl.LOCK_UN)
    c.close()
    assert b_in.wait(5)  # once c lets go, b gets the lock
    b.join(5)


def test_the_search_removes_staging_folders_no_live_trial_owns(tmp_path, caplog):
    from finetune.hparam_search import remove_stale_staging

    study = tmp_path / "study"
    (study / ".trial-0003.k2j4h1").mkdir(parents=True)  # a crash cut trial 3 off mid-training
    (study / ".trial-0003.k2j4h1" / "checkpoints").mkdir()
    (study / ".trial-0004.x9y8z7").mkdir()  # trial 4 is training right now
    (study / "trial-0001").mkdir()  # the best trial's model, kept
    (study / "study.db").write_text("")
    with caplog.at_level(logging.INFO, logger="finetune.hparam_search"):
        assert remove_stale_staging(study, live_trials=[4]) == 1
    assert "removed 1 staging folder" in caplog.text
    assert sorted(p.name for p in study.iterdir()) == [".trial-0004.x9y8z7", "study.db", "trial-0001"]
    assert remove_stale_staging(study) == 1  # with no live trial, trial 4's is stale too
    assert sorted(p.name for p in study.iterdir()) == ["study.db", "trial-0001"]
