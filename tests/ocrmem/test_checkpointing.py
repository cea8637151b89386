"""ocrmem.checkpointing: resume checks, real write errors, the output-dir lock, and saves under a
fault injected at every step of the write (the tiny preset, real HF Trainer, real files)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import logging
import os
import resource
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import ocrmem.modeling
from ocrmem import CheckpointError, MEMModel
from ocrmem.checkpointing import (
    LOCK_NAME,
    PREFIX,
    OutputDirLock,
    as_write_error,
    check_resume_checkpoint,
    inspect_checkpoint,
    list_checkpoints,
    recover_checkpoints,
)
from ocrmem.data import MemoryCollator, synthetic_memory_examples
from ocrmem.errors import OutputDirLockedError
from ocrmem.training import AdapterOnlyTrainer

STEPS, SAVE_STEPS = 4, 2  # the template run: checkpoint-2, checkpoint-4, then the final adapter
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "model.safetensors")


def make_trainer(model: MEMModel, out: Path, **overrides) -> AdapterOnlyTrainer:
    allow_partial = overrides.pop("allow_partial_resume", False)
    kwargs = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=1, learning_rate=1e-3,
                  save_steps=SAVE_STEPS, logging_steps=1, report_to="none", remove_unused_columns=False,
                  use_cpu=True, seed=0, disable_tqdm=True)
    kwargs.update(overrides)
    return AdapterOnlyTrainer(model=model, args=TrainingArguments(**kwargs),
                              train_dataset=synthetic_memory_examples(8, seed=0),
                              data_collator=MemoryCollator.for_model(model), allow_partial_resume=allow_partial)


@pytest.fixture(scope="module")
def template(tiny_dir, tmp_path_factory):
    """One real 4-step run (checkpoint-2, checkpoint-4) plus the final adapter in the same dir; the
    trainer stays usable for more saves."""
    out = tmp_path_factory.mktemp("template") / "run"
    model = MEMModel.from_pretrained(tiny_dir)
    trainer = make_trainer(model, out)
    trainer.train()
    trainer.save_model(str(out))
    return {"out": out, "trainer": trainer, "model": model}


def copy_run(template, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(template["out"], run)
    return run


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime: equal snapshots = nothing was written."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x80\x02garbage" * 7)


class TestResumeChecks:
    @pytest.mark.parametrize("how", ["truncated", "garbage"])
    @pytest.mark.parametrize("name", RESUME_FILES)
    def test_corrupt_file_is_named_with_the_intact_checkpoint(self, template, tmp_path, name, how):
        run = copy_run(template, tmp_path)
        damage(run / "checkpoint-4" / name, how)
        with pytest.raises(CheckpointError) as raised:
            check_resume_checkpoint(str(run / "checkpoint-4"))
        message = str(raised.value)
        assert f"{run / 'checkpoint-4' / name} is corrupt" in message
        assert f"resume from {run / 'checkpoint-2'} instead" in message.lower()
        assert "will likely succeed" not in message and "weights_only=False" not in message
        assert "\n" not in message

    def test_trainer_refuses_a_corrupt_checkpoint_before_training(self, template, tiny_dir, tmp_path):
        run = copy_run(template, tmp_path)
        damage(run / "checkpoint-4" / "optimizer.pt", "truncated")
        before, model = snapshot(run), MEMModel.from_pretrained(tiny_dir)
        weights = {k: v.clone() for k, v in model.trainable_state_dict().items()}
        trainer = make_trainer(model, run, max_steps=6)
        with pytest.raises(CheckpointError, match="optimizer.pt is corrupt"):
            trainer.train(resume_from_checkpoint=True)  # True = the newest, checkpoint-4
        assert trainer.state.global_step == 0 and snapshot(run) == before
        for key, value in model.trainable_state_dict().items():
            assert torch.equal(value, weights[key])

    @pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
    def test_missing_optimizer_or_scheduler_is_refused(self, template, tmp_path, name):
        run = copy_run(template, tmp_path)
        (run / "checkpoint-4" / name).unlink()
        with pytest.raises(CheckpointError) as raised:
            check_resume_checkpoint(str(run / "checkpoint-4"))
        message = str(raised.value)
        assert f"incomplete checkpoint ({name} missing)" in message
        assert "optimizer state" in message and "learning-rate schedule" in message  # HF loads both or neither
        assert str(run / "checkpoint-2") in message and "--resume-partial" in message

    def test_final_output_dir_is_not_a_checkpoint(self, template, tmp_path):
        run = copy_run(template, tmp_path)
        with pytest.raises(CheckpointError, match="final output dir, not a checkpoint") as raised:
            check_resume_checkpoint(str(run))
        assert f"resume from {run / 'checkpoint-4'} instead" in str(raised.value).lower()

    @pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.json"])
    def test_missing_weights_or_state_is_refused_even_when_partial_is_allowed(self, template, tmp_path, name):
        run = copy_run(template, tmp_path)
        (run / "checkpoint-4" / name).unlink()
        with pytest.raises(CheckpointError, match=f"it is not a checkpoint \\({name} missing\\)"):
            check_resume_checkpoint(str(run / "checkpoint-4"), allow_partial=True)

    def test_allowed_partial_resume_says_what_restarts_and_trains(self, template, tiny_dir, tmp_path, caplog):
        run = copy_run(template, tmp_path)
        (run / "checkpoint-4" / "scheduler.pt").unlink()
        trainer = make_trainer(MEMModel.from_pretrained(tiny_dir), run, max_steps=5, save_strategy="no",
                               allow_partial_resume=True)
        with caplog.at_level(logging.WARNING, logger="ocrmem"):
            trainer.train(resume_from_checkpoint=str(run / "checkpoint-4"))
        warned = [r.getMessage() for r in caplog.records if "allow_partial_resume" in r.getMessage()]
        assert len(warned) == 1 and "scheduler.pt missing" in warned[0] and "learning-rate schedule (from step 0)" in warned[0]
        assert trainer.state.global_step == 5
        assert trainer.lr_scheduler.last_epoch == 1  # the schedule really restarted: one step since the resume

    @pytest.mark.parametrize("max_steps", [STEPS, STEPS - 1])
    def test_max_steps_at_or_below_the_checkpoint_trains_and_writes_nothing(self, template, tiny_dir, tmp_path, caplog, max_steps):
        run = copy_run(template, tmp_path)
        before, model = snapshot(run), MEMModel.from_pretrained(tiny_dir)
        weights = {k: v.clone() for k, v in model.trainable_state_dict().items()}
        trainer = make_trainer(model, run, max_steps=max_steps)
        with caplog.at_level(logging.WARNING, logger="ocrmem"):
            result = trainer.train(resume_from_checkpoint=str(run / "checkpoint-4"))
        assert result.global_step == STEPS
        assert any(f"Nothing to train: {run / 'checkpoint-4'} is at step {STEPS} and max_steps is {max_steps}" in r.getMessage()
                   for r in caplog.records)
        assert snapshot(run) == before
        for key, value in model.trainable_state_dict().items():
            assert torch.equal(value, weights[key])


# ------------------------------------------------------------------------------ real write errors


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process, with SIGXFSZ ignored so writes fail with EFBIG instead of
    killing the process — a real limit hit by torch's and safetensors' own writers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


class LimitAtStep(TrainerCallback):
    """Turn the file-size limit on just before the save of step ``step`` (earlier checkpoints are written)."""

    def __init__(self, step: int, stack: contextlib.ExitStack, nbytes: int) -> None:
        self.step, self.stack, self.nbytes = step, stack, nbytes

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.stack.enter_context(file_size_limit(self.nbytes))


class TestWriteErrors:
    def test_what_torch_and_safetensors_really_raise_is_recognised(self, tmp_path):
        from safetensors.torch import save_file

        tensors = {"a": torch.zeros(10_000)}  # 40 kB > the 10 kB limit
        raised = []
        with file_size_limit(10_000):
            for write in (lambda: torch.save(tensors, tmp_path / "a.pt"), lambda: save_file(tensors, str(tmp_path / "a.safetensors"))):
                with pytest.raises(Exception) as caught:
                    write()
                raised.append(caught.value)
        assert not any(isinstance(err, OSError) for err in raised)  # why catching OSError alone missed them
        assert isinstance(raised[0], RuntimeError) and isinstance(raised[1], SafetensorError)
        recognised = [as_write_error(err) for err in raised]
        assert all(isinstance(err, OSError) for err in recognised)
        assert recognised[1].errno == errno.EFBIG
        assert as_write_error(RuntimeError("CUDA error: device-side assert triggered")) is None  # not every RuntimeError

    # 20 kB: model.safetensors (33 kB) fails in safetensors; 50 kB: it passes, optimizer.pt (71 kB) fails in torch.save.
    @pytest.mark.parametrize("limit", [pytest.param(20_000, marks=pytest.mark.slow), 50_000], ids=["safetensors", "torch.save"])
    def test_limit_hit_mid_checkpoint_gives_the_message_and_keeps_the_previous(self, tiny_model, tmp_path, limit):
        run = tmp_path / "run"
        with contextlib.ExitStack() as stack:
            trainer = make_trainer(tiny_model, run, max_steps=2, save_steps=1)
            trainer.add_callback(LimitAtStep(2, stack, limit))
            with pytest.raises(OSError) as raised:
                trainer.train()
        message = str(raised.value)
        assert f"could not save checkpoint {run / 'checkpoint-2'}" in message and "ulimit -f" in message
        assert sorted(os.listdir(run)) == ["checkpoint-1"]  # no .partial, no lock left
        assert inspect_checkpoint(str(run / "checkpoint-1")) == []

    def test_limit_hit_in_the_final_save_keeps_the_previous_adapter(self, template, tmp_path):
        run = copy_run(template, tmp_path)
        before = (run / "model.safetensors").read_bytes()
        with file_size_limit(20_000), pytest.raises(OSError, match="could not save the adapter to"):
            template["trainer"].save_model(str(run))
        assert (run / "model.safetensors").read_bytes() == before
        assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


# ------------------------------------------------------------------------------ the lock


@contextlib.contextmanager
def lock_held_by_child(directory: Path):
    """A forked child process takes the lock and holds it until the block ends (then is SIGKILLed)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: take the lock, report, wait to be killed
        try:
            OutputDirLock(directory).acquire()
            os.write(ready_w, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1", "the child could not take the lock"
        yield pid
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class TestOutputDirLock:
    def test_a_second_process_is_refused_with_the_holders_pid_and_host(self, tmp_path):
        with lock_held_by_child(tmp_path) as pid:
            with pytest.raises(OutputDirLockedError) as raised:
                OutputDirLock(tmp_path).acquire()
        message = str(raised.value)
        assert f"pid {pid} on host {socket.gethostname()}" in message and str(tmp_path / LOCK_NAME) in message

    def test_a_dead_holders_lock_is_taken_over_with_a_warning(self, tmp_path, caplog):
        with lock_held_by_child(tmp_path) as pid:
            pass  # SIGKILLed at the end of the block: the lock file stays, its holder is gone
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == pid
        with caplog.at_level(logging.WARNING, logger="ocrmem"):
            with OutputDirLock(tmp_path):
                assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert any(f"stale lock {tmp_path / LOCK_NAME} left by pid {pid}" in r.getMessage() for r in caplog.records)
        assert not (tmp_path / LOCK_NAME).exists()  # released = removed

    def test_trainer_refuses_an_output_dir_in_use_and_writes_nothing(self, tiny_model, tmp_path):
        with lock_held_by_child(tmp_path) as pid:
            with pytest.raises(OutputDirLockedError, match=f"pid {pid}"):
                make_trainer(tiny_model, tmp_path).train()
            assert os.listdir(tmp_path) == [LOCK_NAME]


# ------------------------------------------------------------------------------ faults at every write step


class SimulatedKill(BaseException):
    """The process dies here: nothing catches it, no cleanup runs (like SIGKILL)."""


class FaultInjector:
    """Counts the write steps of a save and fails the ``fail_at``-th (1-based).

    A step is a call that changes the filesystem: ``open``/``os.open`` for writing, ``os.mkdir``,
    ``os.rename``/``os.replace``, ``os.unlink``/``os.remove``/``os.rmdir`` (also inside
    ``shutil.rmtree``), ``os.fsync``, ``torch.save`` and safetensors' ``save_file``. ``mode``:
    ``"kill"`` raises :class:`SimulatedKill` (the process dies before the step; a tensor file is
    left half-written), ``"error"`` raises what the OS or library raises on a full disk.
    """

    OS_CALLS = ("mkdir", "rename", "replace", "unlink", "remove", "rmdir", "fsync")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None, mode: str = "kill") -> None:
        self.monkeypatch, self.fail_at, self.mode = monkeypatch, fail_at, mode
        self.steps: list[str] = []
        self._open = builtins.open  # the real one, for the injector's own writes

    def _step(self, what: str, partial_file: str | None = None, real=None) -> None:
        self.steps.append(what)
        if len(self.steps) != self.fail_at:
            return
        if partial_file is not None:  # the writer got half way
            real()
            with self._open(partial_file, "r+b") as handle:
                handle.truncate(os.path.getsize(partial_file) // 2)
        if self.mode == "kill":
            raise SimulatedKill(what)
        if what.startswith("torch.save"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        if what.startswith("save_file"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    @contextlib.contextmanager
    def active(self):
        with self.monkeypatch.context() as patch:
            for name in self.OS_CALLS:
                real = getattr(os, name)
                patch.setattr(os, name, self._wrap_os(name, real))
            real_os_open = os.open

            def os_open(path, flags, *args, **kwargs):
                if flags & self.WRITE_FLAGS:
                    self._step(f"os.open {os.path.basename(os.fspath(path))}")
                return real_os_open(path, flags, *args, **kwargs)

            patch.setattr(os, "open", os_open)
            real_open = builtins.open

            def open_(file, mode="r", *args, **kwargs):
                if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                    self._step(f"open({os.path.basename(os.fspath(file))!r}, {mode!r})")
                return real_open(file, mode, *args, **kwargs)

            patch.setattr(builtins, "open", open_)
            patch.setattr(io, "open", open_)  # pathlib writes through io.open
            real_torch_save = torch.save

            def torch_save(obj, f, *args, **kwargs):
                call = lambda: real_torch_save(obj, f, *args, **kwargs)  # noqa: E731
                self._step(f"torch.save {os.path.basename(os.fspath(f))}", os.fspath(f), call)
                return call()

            patch.setattr(torch, "save", torch_save)
            real_save_file = ocrmem.modeling.save_file

            def save_file(tensors, filename, *args, **kwargs):
                call = lambda: real_save_file(tensors, filename, *args, **kwargs)  # noqa: E731
                self._step(f"save_file {os.path.basename(os.fspath(filename))}", os.fspath(filename), call)
                return call()

            patch.setattr(ocrmem.modeling, "save_file", save_file)
            yield self

    def _wrap_os(self, name, real):
        def call(*args, **kwargs):
            self._step(f"os.{name} {os.path.basename(os.fspath(args[0])) if args and not isinstance(args[0], int) else ''}")
            return real(*args, **kwargs)

        return call


def visible_steps(run: Path) -> list[int]:
    return [int(Path(p).name.rsplit("-", 1)[1]) for p in list_checkpoints(str(run))]


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".partial") or p.name.endswith(".tmp") or p.name == LOCK_NAME)


def assert_restartable(run: Path, model: MEMModel, must_keep: set[int], newest_at_least: int, context: str) -> None:
    """What a restarted process sees (after its recovery step): every visible checkpoint intact,
    the newest loadable into the model, none of ``must_keep`` lost."""
    recover_checkpoints(str(run))
    steps = visible_steps(run)
    assert must_keep <= set(steps), f"{context}: checkpoints {sorted(must_keep - set(steps))} lost; visible {steps}"
    assert steps and steps[-1] >= newest_at_least, f"{context}: newest visible {steps}, expected >= {newest_at_least}"
    for step in steps:
        problems = inspect_checkpoint(str(run / f"{PREFIX}-{step}"))
        assert not problems, f"{context}: visible checkpoint-{step} is not intact: {problems}"
    model.load_adapter_weights(run / f"{PREFIX}-{steps[-1]}" / "model.safetensors")


def checkpoint_save(trainer: AdapterOnlyTrainer, step: int) -> None:
    trainer.state.global_step = step
    trainer._save_checkpoint(trainer.model, trial=None)


# name: (checkpoints before, save_total_limit, step saved, checkpoints that must survive any fault,
# the step the newest must at least have). The template run has checkpoint-2 and checkpoint-4.
SCENARIOS = {
    "rotation": ((2, 4), 2, 6, {4}, 4),  # checkpoint-6 written, checkpoint-2 rotated away
    "replace": ((2, 4), None, 4, {2, 4}, 4),  # checkpoint-4 written again (a rerun): the old one renamed aside
    # Both at once (a rerun with a lower save_total_limit): checkpoint-6 replaced, checkpoint-2 rotated away.
    "replace+rotation": ((2, 4, 6), 2, 6, {4, 6}, 6),
}


class TestFaultAtEveryWriteStep:
    def _run(self, template, tmp_path, monkeypatch, scenario: str, mode: str) -> int:
        trainer, model = template["trainer"], template["model"]
        before, limit, step, must_keep, newest = SCENARIOS[scenario]
        run, original = tmp_path / "run", tmp_path / "original"
        shutil.copytree(template["out"], original)
        monkeypatch.setattr(trainer.args, "save_total_limit", None)
        monkeypatch.setattr(trainer.args, "output_dir", str(original))
        for extra in sorted(set(before) - {2, 4}):
            checkpoint_save(trainer, extra)
        assert visible_steps(original) == list(before)
        shutil.copytree(original, run)
        monkeypatch.setattr(trainer.args, "save_total_limit", limit)
        monkeypatch.setattr(trainer.args, "output_dir", str(run))

        def reset() -> None:
            shutil.rmtree(run)
            shutil.copytree(original, run)

        counter = FaultInjector(monkeypatch)
        with counter.active():
            checkpoint_save(trainer, step)
        total = len(counter.steps)
        assert total >= 15, counter.steps  # a real save has this many steps; fewer = the instrumentation broke
        assert any(s.startswith("os.rename") for s in counter.steps)
        for fail_at in range(1, total + 1):
            reset()
            what = f"{scenario}/{mode} at step {fail_at}/{total} ({counter.steps[fail_at - 1]})"
            try:
                with FaultInjector(monkeypatch, fail_at, mode).active():
                    checkpoint_save(trainer, step)
            except SimulatedKill:
                assert mode == "kill"
            except OSError as err:
                assert mode == "error" and "could not save checkpoint" in str(err), f"{what}: {err}"
            assert_restartable(run, model, must_keep, newest, what)
            checkpoint_save(trainer, step + 2)  # the next save (a restarted process) cleans up
            assert leftovers(run) == [], f"{what}: left {leftovers(run)} after the next save"
            assert_restartable(run, model, {step + 2}, step + 2, what + ", next save")
        return total

    # The default run covers the replace + rotation save (~40 steps); the slow suite each alone too.
    @pytest.mark.parametrize("scenario", [
        "replace+rotation", pytest.param("rotation", marks=pytest.mark.slow), pytest.param("replace", marks=pytest.mark.slow),
    ])
    def test_a_kill_at_any_step_keeps_a_loadable_newest_checkpoint(self, template, tmp_path, monkeypatch, scenario):
        self._run(template, tmp_path, monkeypatch, scenario, "kill")

    @pytest.mark.slow
    @pytest.mark.parametrize("scenario", sorted(SCENARIOS))
    def test_a_write_error_at_any_step_leaves_nothing_partial(self, template, tmp_path, monkeypatch, scenario):
        self._run(template, tmp_path, monkeypatch, scenario, "error")

    @pytest.mark.parametrize("mode", ["kill", "error"])
    def test_the_final_save_keeps_a_loadable_adapter_at_any_step(self, template, tmp_path, monkeypatch, mode):
        trainer, model = template["trainer"], template["model"]
        out = tmp_path / "final"
        trainer.save_model(str(out))
        counter = FaultInjector(monkeypatch)
        with counter.active():
            trainer.save_model(str(out))
        assert len(counter.steps) >= 8, counter.steps
        for fail_at in range(1, len(counter.steps) + 1):
            what = f"final/{mode} at step {fail_at} ({counter.steps[fail_at - 1]})"
            try:
                with FaultInjector(monkeypatch, fail_at, mode).active():
                    trainer.save_model(str(out))
            except SimulatedKill:
                assert mode == "kill"
            except OSError as err:
                assert mode == "error" and "could not save the adapter" in str(err), f"{what}: {err}"
            model.load_adapter_weights(out / "model.safetensors")  # old or new, never torn
            json.loads((out / "config.json").read_text())
            trainer.save_model(str(out))
            assert leftovers(out) == [], f"{what}: left {leftovers(out)}"


def test_checkpoint_prefix_matches_transformers():
    assert PREFIX == PREFIX_CHECKPOINT_DIR
