"""Checkpoint saves survive SIGKILL mid-save, and write errors say which path failed."""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ocrmem import MEMModel
from ocrmem.data import MemoryCollator, synthetic_memory_examples
from ocrmem.checkpointing import LOCK_NAME, inspect_checkpoint, list_checkpoints
from ocrmem.training import PAUSE_ENV, PAUSE_MARKER, AdapterOnlyTrainer, publish_checkpoint

REPO = Path(__file__).resolve().parents[2]
KILL_AT = 4  # the save of checkpoint-4 is killed; checkpoint-2 is complete by then


def train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ocrmem.train", "--output-dir", str(out), "--num-examples", "16",
            "--batch-size", "1", "--save-steps", "2", "--logging-steps", "1",
            "--reader-pretrain-steps", "0", *extra]  # crash safety needs no reader: save the seconds


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.mark.slow  # a killed subprocess save, ~60 s on 2 cores
def test_sigkill_mid_save_leaves_the_previous_checkpoint_last_and_loadable(tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            train_command(out, "--max-steps", "6"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
            env=subprocess_env(**{PAUSE_ENV: f"300:{KILL_AT}"}),
        )
        try:
            deadline = time.monotonic() + 180
            while PAUSE_MARKER not in log.read_text(errors="replace"):
                assert proc.poll() is None, f"training ended before the save of checkpoint-{KILL_AT}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the pause hook never fired"
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)  # in the middle of the save: weights written, optimizer not
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    staged = out / f".checkpoint-{KILL_AT}.partial" / f"checkpoint-{KILL_AT}"
    assert (staged / "model.safetensors").is_file() and not (staged / "optimizer.pt").exists()
    assert not (out / f"checkpoint-{KILL_AT}").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    MEMModel.from_pretrained(out / "checkpoint-2")  # complete and loadable (absolute model paths)

    # The run resumes from it and the staging debris goes away with the next save.
    done = subprocess.run(
        train_command(out, "--max-steps", "6", "--resume-from-checkpoint", "last"),
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert f"Taking over the stale lock {out / LOCK_NAME} left by pid {proc.pid}" in done.stderr  # the killed run's
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_second_training_into_the_same_dir_is_refused_while_the_first_saves(tmp_path):
    """Two real trainings: the second starts while the first is paused inside a save, exits 2 naming
    the first's pid, and touches nothing; the first then finishes with every checkpoint intact."""
    out, log = tmp_path / "run", tmp_path / "first.log"
    with open(log, "w") as stderr:
        first = subprocess.Popen(train_command(out, "--max-steps", "4"), cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=stderr, env=subprocess_env(**{PAUSE_ENV: "25:4"}))
        try:
            deadline = time.monotonic() + 180
            while PAUSE_MARKER not in log.read_text(errors="replace"):
                assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            second = subprocess.run(train_command(out, "--max-steps", "4"), cwd=REPO, env=subprocess_env(),
                                    capture_output=True, text=True, timeout=300)
            assert first.poll() is None, "the first training must still be inside its save"
            assert (out / ".checkpoint-4.partial").is_dir()  # the second did not delete the first's save
        finally:
            first.wait(timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another training (pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, log.read_text()[-3000:]
    assert [p.name for p in list_checkpoints_paths(out)] == ["checkpoint-2", "checkpoint-4"]
    assert all(inspect_checkpoint(str(p)) == [] for p in list_checkpoints_paths(out))


def list_checkpoints_paths(out: Path) -> list[Path]:
    return [Path(p) for p in list_checkpoints(str(out))]


def _limit_file_size(nbytes: int):
    def preexec() -> None:  # SIG_IGN survives exec: the write fails with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return preexec


@pytest.mark.slow
def test_file_size_limit_while_saving_exits_2_with_one_line_and_no_partial(tiny_dir, tmp_path):
    """A real ``ulimit -f`` hit by torch.save (optimizer.pt, ~70 kB) in the first checkpoint."""
    out = tmp_path / "run"
    done = subprocess.run(
        train_command(out, "--max-steps", "4", "--model-dir", str(tiny_dir)), cwd=REPO, env=subprocess_env(),
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(50_000),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("python -m ocrmem.train: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert f"could not save checkpoint {out / 'checkpoint-2'}" in errors[0] and "ulimit -f" in errors[0]
    assert sorted(os.listdir(out)) == []  # no .partial, no lock


def _trainer(model: MEMModel, out: Path) -> AdapterOnlyTrainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=1, save_steps=2, logging_steps=1,
        report_to="none", remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
    )
    return AdapterOnlyTrainer(
        model=model, args=args, train_dataset=synthetic_memory_examples(4, seed=0),
        data_collator=MemoryCollator.for_model(model),
    )


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ],
)
def test_write_errors_name_the_checkpoint_and_keep_the_previous_one(tiny_model, tmp_path, monkeypatch, error, words):
    original = MEMModel.save_pretrained
    calls = []

    def failing_save(self, save_directory, *args, **kwargs):
        calls.append(save_directory)
        if len(calls) == 2:  # checkpoint-2 saves fine, checkpoint-4 hits the error
            raise type(error)(error.errno, error.strerror, str(Path(save_directory) / "model.safetensors"))
        return original(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(MEMModel, "save_pretrained", failing_save)
    with pytest.raises(type(error)) as raised:
        _trainer(tiny_model, tmp_path).train()
    message = str(raised.value)
    assert raised.value.errno == error.errno
    assert str(tmp_path / "checkpoint-4") in message and words in message and "df -h" in message
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # nothing partial left


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_output_dir_gives_a_clear_error(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    trainer = _trainer(tiny_model, out)
    out.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="could not save checkpoint") as raised:
            trainer.train()
    finally:
        out.chmod(0o700)
    assert str(out) in str(raised.value)


def test_publish_replaces_an_existing_checkpoint(tmp_path):
    staged = tmp_path / ".checkpoint-2.partial" / "checkpoint-2"
    staged.mkdir(parents=True)
    (staged / "new").write_text("new")
    final = tmp_path / "checkpoint-2"
    final.mkdir()
    (final / "old").write_text("old")
    publish_checkpoint(str(staged), str(final))
    assert sorted(os.listdir(final)) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
