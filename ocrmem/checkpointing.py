"""Checkpoints on disk: publishing and rotating them atomically, checking one before a resume, and
the lock that keeps two trainings out of one output dir.

Why each piece exists:

* **Publishing** (:func:`publish_checkpoint`): a checkpoint is written into a hidden
  ``.checkpoint-N.partial/`` dir and renamed to ``checkpoint-N`` only when every file is on disk.
  An existing ``checkpoint-N`` (a rerun into the same dir) is first *renamed aside* to
  ``.checkpoint-N.old.partial`` and deleted only after the new one is in place; a process killed
  between the two renames leaves the old one there, and :func:`recover_checkpoints` puts it back.
* **Rotation** (:func:`rotate_checkpoints`, ``save_total_limit``): HF deletes old checkpoints with
  ``rmtree`` in place, so a process killed mid-delete leaves a visible, half-deleted
  ``checkpoint-N``. Here each one is renamed to ``.checkpoint-N.rotated.partial`` first (one atomic
  step), then deleted; leftovers are hidden and removed by the next save.
* **Resume checks** (:func:`check_resume_checkpoint`): HF resumes silently from a checkpoint without
  ``optimizer.pt`` / ``scheduler.pt`` (restarting Adam and the LR schedule) and shows raw tracebacks
  for corrupt files, one of them torch's advice to retry with ``weights_only=False`` (which would
  run whatever code the file holds). Every file a resume reads is read here first, before any
  training starts; a problem names the file, says what is wrong and names the newest intact
  checkpoint to resume from instead.
* **Write errors** (:func:`as_write_error`): ``torch.save`` raises a bare ``RuntimeError``
  ("unexpected pos 576 vs 534") and safetensors a ``SafetensorError`` when the disk is full or a
  file-size limit is hit, not an ``OSError``; they are recognised and turned into an ``OSError``
  whose message names the checkpoint, the free space and the fix.
* **The output-dir lock** (:class:`OutputDirLock`): a second training into the same dir deleted the
  first one's in-progress save. ``OUTPUT_DIR/.ocrmem-train.lock`` holds an exclusive ``flock`` and
  the holder's pid, host and start time; a lock whose holder died (the kernel drops a ``flock`` with
  its process) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, OutputDirLockedError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"  # = transformers.trainer_utils.PREFIX_CHECKPOINT_DIR (checked in the tests)
PARTIAL_SUFFIX = ".partial"  # staging dirs are `.checkpoint-N.partial`: hidden, never matched by `checkpoint-*`
OLD_SUFFIX = f".old{PARTIAL_SUFFIX}"  # a published checkpoint set aside while a new one replaces it
ROTATED_SUFFIX = f".rotated{PARTIAL_SUFFIX}"  # a checkpoint being deleted by rotation
LOCK_NAME = ".ocrmem-train.lock"

TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng_state.pth"

# What restarts when a resume goes without a file (HF loads optimizer and scheduler only together).
RESTARTS = {
    OPTIMIZER: "the optimizer state (Adam moments from zero)",
    SCHEDULER: "the learning-rate schedule (from step 0)",
    RNG: "the RNG state (data order and dropout then differ from an uninterrupted run)",
}
_CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")


# ---------------------------------------------------------------------------------------- fsync


def fsync_tree(path: str) -> None:
    """Flush every file under ``path`` (and the directories) to disk before the rename publishes it."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


def fsync_dir(path: str) -> None:
    """Flush a directory entry (best effort: some filesystems cannot open or sync directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- layout


def checkpoint_step(path: str) -> int | None:
    """``N`` for a dir named ``checkpoint-N``, else ``None``."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str) -> list[str]:
    """The visible ``checkpoint-N`` dirs of ``run_dir``, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(checkpoint_step(name), os.path.join(run_dir, name)) for name in os.listdir(run_dir)]
    return [path for step, path in sorted((s, p) for s, p in found if s is not None and os.path.isdir(p))]


def _old_name(final_dir: str) -> str:
    return os.path.join(os.path.dirname(final_dir), f".{os.path.basename(final_dir)}{OLD_SUFFIX}")


def recover_checkpoints(run_dir: str) -> list[str]:
    """Put back every checkpoint an interrupted save set aside and never replaced; returns them.

    ``.checkpoint-N.old.partial`` is a complete, published checkpoint renamed aside while a new
    ``checkpoint-N`` was being moved into place; if the process died before that move, there is no
    ``checkpoint-N`` and the old one is the right one to keep.
    """
    restored = []
    for aside in sorted(glob.glob(os.path.join(glob.escape(run_dir), f".{PREFIX}-*{OLD_SUFFIX}"))):
        final_dir = os.path.join(run_dir, os.path.basename(aside)[1 : -len(OLD_SUFFIX)])
        if checkpoint_step(final_dir) is None or os.path.lexists(final_dir):
            continue
        os.rename(aside, final_dir)
        logger.warning("Restored %s: an interrupted save had set it aside to replace it.", final_dir)
        restored.append(final_dir)
    return restored


def remove_partial_checkpoints(run_dir: str) -> list[str]:
    """Restore set-aside checkpoints (:func:`recover_checkpoints`), then delete the staging dirs that
    interrupted saves and rotations left in ``run_dir``; returns what it deleted."""
    recover_checkpoints(run_dir)
    stale = sorted(glob.glob(os.path.join(glob.escape(run_dir), f".{PREFIX}-*{PARTIAL_SUFFIX}")))
    for path in stale:
        logger.info("Removing %s, left by an interrupted checkpoint save.", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish_checkpoint(staged_dir: str, final_dir: str) -> None:
    """Flush ``staged_dir`` to disk and rename it to ``final_dir``, replacing an older one.

    An older ``final_dir`` is renamed aside first and deleted only once the new one is in place; if
    the second rename fails it is put back. Cleanup after the swap is best effort (a leftover is
    hidden and removed by the next save).
    """
    fsync_tree(staged_dir)
    aside = None
    if os.path.lexists(final_dir):  # e.g. a rerun into the same output dir: keep the old one until the swap
        aside = _old_name(final_dir)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final_dir, aside)
    try:
        os.rename(staged_dir, final_dir)
    except BaseException:
        if aside is not None and not os.path.lexists(final_dir):
            os.rename(aside, final_dir)
        raise
    fsync_dir(os.path.dirname(final_dir))
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(staged_dir))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def rotate_checkpoints(run_dir: str, save_total_limit: int | None, best_model_checkpoint: str | None = None) -> list[str]:
    """Keep the newest ``save_total_limit`` checkpoints (and the best one), HF's rule; returns the deleted.

    Each deleted checkpoint is renamed aside (atomic) before ``rmtree``, so a process killed
    mid-delete leaves no visible half-deleted checkpoint. A failure to delete is a warning, not a
    failed save: the new checkpoint is already published.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(run_dir)
    if len(checkpoints) <= save_total_limit:
        return []
    protected = {checkpoints[-1]}  # the newest, to resume from
    if best_model_checkpoint is not None:
        protected.add(os.path.join(run_dir, os.path.basename(os.path.normpath(best_model_checkpoint))))
    keep = max(save_total_limit, len(protected))
    deleted = []
    for path in checkpoints:
        if len(checkpoints) - len(deleted) <= keep:
            break
        if path in protected:
            continue
        aside = os.path.join(run_dir, f".{os.path.basename(path)}{ROTATED_SUFFIX}")
        try:
            os.rename(path, aside)
        except OSError as err:
            # Stop: deleting a newer one instead would keep an older checkpoint than asked for.
            logger.warning("save_total_limit: could not remove %s (%s); delete it by hand.", path, err)
            break
        deleted.append(path)
        shutil.rmtree(aside, ignore_errors=True)
    return deleted


def remove_stale_temp_files(directory: str) -> list[str]:
    """Delete the ``.NAME.*.tmp`` files a killed final save left (the temporary files of
    :meth:`~ocrmem.modeling.MEMModel.save_pretrained` and of the trainer's own writes)."""
    stale = []
    for name in (WEIGHTS, "config.json", "training_args.bin", TRAINER_STATE):
        stale += glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.tmp"))
    for path in sorted(stale):
        logger.info("Removing %s, left by an interrupted save.", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return stale


# ---------------------------------------------------------------------------------------- write errors


_SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITER_SIGNS = ("inline_container.cc", "PytorchStreamWriter", "unexpected pos", "file write failed")


def as_write_error(err: BaseException) -> OSError | None:
    """The :class:`OSError` a failed checkpoint write really is, or ``None`` if ``err`` is no write error.

    ``torch.save`` reports a full disk / ``ulimit -f`` as ``RuntimeError: [enforce fail at
    inline_container.cc:...] unexpected pos ...`` (no errno); safetensors as ``SafetensorError:
    ... No space left on device (os error 28)``.
    """
    if isinstance(err, OSError):
        return err
    text = str(err)
    if type(err).__name__ == "SafetensorError":
        match = _SAFETENSORS_OS_ERROR.search(text)
        if match:
            code = int(match.group(1))
            return OSError(code, f"{os.strerror(code)} (safetensors: {text})")
        return None
    if isinstance(err, RuntimeError) and any(sign in text for sign in _TORCH_WRITER_SIGNS):
        return OSError(errno.EIO, f"torch.save could not write the file ({text.strip()}); torch reports a "
                                  "full disk or a file-size limit (ulimit -f) this way")
    return None


def write_error_message(err: OSError, what: str, run_dir: str) -> str:
    """``could not save <what>: <reason>`` + free space + what to do."""
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:,.0f} MiB free on {run_dir}"
    except OSError:
        free = f"free space on {run_dir} unknown"
    return (
        f"could not save {what}: {reason}{where}. Nothing partial was left behind and earlier checkpoints "
        f"in {run_dir} are intact ({free}); check free disk space (`df -h {run_dir}`), the file-size limit "
        f"(`ulimit -f`) and write permission on {run_dir}, then resume with resume_from_checkpoint."
    )


def reraise_as(err: OSError, message: str) -> OSError:
    """An OSError of the same class and errno as ``err`` carrying ``message``."""
    try:
        return type(err)(err.errno, message) if err.errno is not None else type(err)(message)
    except TypeError:  # an OSError subclass with another constructor
        return OSError(err.errno, message)


# ---------------------------------------------------------------------------------------- resume checks


@dataclass(frozen=True)
class FileProblem:
    """One file of a checkpoint that a resume cannot use."""

    name: str
    kind: str  # "missing" | "corrupt"
    reason: str = ""


def _short_reason(err: BaseException) -> str:
    """One line about why a file did not load; never torch's advice to retry with ``weights_only=False``."""
    text = str(err).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text) or re.search(r"(Trying to load unsupported GLOBAL \S+)", text)
        detail = f" ({match.group(1).strip()})" if match else ""
        return (f"it is not a plain tensor file: torch.load(weights_only=True) refuses it{detail}; never load it "
                "with that check turned off: a file that fails it can run arbitrary code")
    first = text.splitlines()[0] if text else ""
    first = first.split(". This is an internal miniz error")[0]
    return f"{type(err).__name__}: {first}" if first else f"{type(err).__name__} (empty or truncated)"


def _read_trainer_state(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError("no integer `global_step` in it")


def _read_safetensors(path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key)


def _read_torch(path: str, expect: tuple[str, ...] = ()) -> None:
    import torch

    from . import compat

    with compat.numpy_safe_globals():  # the RNG state holds numpy's
        value = torch.load(path, map_location="cpu", weights_only=True)
    if expect and (not isinstance(value, dict) or not set(expect) <= set(value)):
        raise ValueError(f"not the expected dict with keys {list(expect)}")


def rng_file_name(world_size: int = 1, process_index: int = 0) -> str:
    """HF's name for the RNG state of one process."""
    return RNG if world_size <= 1 else f"rng_state_{process_index}.pth"


def inspect_checkpoint(path: str, *, rng_file: str = RNG, model_state_only: bool = False) -> list[FileProblem]:
    """Read every file a resume reads and return what is missing or corrupt (empty: intact).

    Args:
        path: the checkpoint dir.
        rng_file: this process's RNG file (:func:`rng_file_name`).
        model_state_only: check only ``trainer_state.json`` (DeepSpeed keeps the rest in its own format).
    """
    readers: dict[str, Any] = {TRAINER_STATE: _read_trainer_state}
    if not model_state_only:
        readers.update({
            WEIGHTS: _read_safetensors,
            OPTIMIZER: lambda p: _read_torch(p, ("state", "param_groups")),
            SCHEDULER: lambda p: _read_torch(p),
            rng_file: lambda p: _read_torch(p, ("python", "numpy", "cpu")),
        })
    problems = []
    for name, read in readers.items():
        file = os.path.join(path, name)
        if not os.path.lexists(file):
            problems.append(FileProblem(name, "missing"))
            continue
        try:
            read(file)
        except Exception as err:  # noqa: BLE001 - torch/safetensors/json raise many types; all mean "unreadable"
            problems.append(FileProblem(name, "corrupt", _short_reason(err)))
    return problems


def newest_intact_checkpoint(run_dir: str, *, exclude: str | None = None, rng_file: str = RNG) -> str | None:
    """The newest ``checkpoint-N`` in ``run_dir`` with no problem (:func:`inspect_checkpoint`)."""
    skip = os.path.realpath(exclude) if exclude else None
    for path in reversed(list_checkpoints(run_dir)):
        if os.path.realpath(path) != skip and not inspect_checkpoint(path, rng_file=rng_file):
            return path
    return None


def _instead(path: str, rng_file: str) -> str:
    """Where to resume from instead of ``path``: its own checkpoints (an output dir) or its siblings."""
    candidates = [path, os.path.dirname(os.path.normpath(path))]
    for run_dir in candidates:
        intact = newest_intact_checkpoint(run_dir, exclude=path, rng_file=rng_file)
        if intact is not None:
            return f"resume from {intact} instead, the newest intact checkpoint"
    return f"no intact checkpoint is next to it ({candidates[-1]}); start from scratch (no resume)"


def check_resume_checkpoint(path: str, *, allow_partial: bool = False, rng_file: str = RNG,
                            model_state_only: bool = False, warn: bool = True) -> list[str]:
    """Refuse a checkpoint a resume cannot use exactly, before anything is trained.

    Returns:
        What restarts from scratch (empty unless ``allow_partial`` let missing files through;
        ``warn`` logs a warning saying so).

    Raises:
        CheckpointError: ``path`` is no dir, a file is corrupt, ``model.safetensors`` or
            ``trainer_state.json`` is missing, or (without ``allow_partial``) the optimizer,
            scheduler or RNG state is missing. The message names the file and the checkpoint to
            resume from instead.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"resume_from_checkpoint {path}: no such checkpoint dir; {_instead(path, rng_file)}.")
    problems = inspect_checkpoint(path, rng_file=rng_file, model_state_only=model_state_only)
    corrupt = [p for p in problems if p.kind == "corrupt"]
    if corrupt:
        files = "; ".join(f"{os.path.join(path, p.name)} is corrupt ({p.reason})" for p in corrupt)
        raise CheckpointError(f"cannot resume from {path}: {files}. {_instead(path, rng_file).capitalize()}.")
    missing = [p.name for p in problems]
    essential = [m for m in missing if m not in RESTARTS and m != rng_file]
    optional = [m for m in missing if m in RESTARTS or m == rng_file]
    is_output_dir = bool(missing) and os.path.isfile(os.path.join(path, "config.json")) and bool(list_checkpoints(path))
    what = "a training's final output dir, not a checkpoint" if is_output_dir else "an incomplete checkpoint"
    if essential:
        what = what if is_output_dir else "not a checkpoint"
        raise CheckpointError(
            f"cannot resume from {path}: it is {what} ({', '.join(missing)} missing). "
            f"{_instead(path, rng_file).capitalize()}."
        )
    if not optional:
        return []
    # HF restores optimizer and scheduler only together: one missing restarts both.
    restarted = [OPTIMIZER, SCHEDULER] if {OPTIMIZER, SCHEDULER} & set(optional) else []
    restarted += [RNG] if rng_file in optional else []
    restarts = [RESTARTS[name] for name in restarted]
    summary = f"{path} is {what} ({', '.join(optional)} missing)"
    if not allow_partial:
        raise CheckpointError(
            f"cannot resume: {summary}; resuming from it would restart {' and '.join(restarts)}. "
            f"{_instead(path, rng_file).capitalize()}, or allow the restart explicitly "
            "(--resume-partial / AdapterOnlyTrainer(allow_partial_resume=True))."
        )
    if warn:
        logger.warning("Resuming from an incomplete checkpoint (allow_partial_resume): %s; restarting %s.",
                       summary, " and ".join(restarts))
    return restarts


def checkpoint_global_step(path: str) -> int:
    """``global_step`` of a checkpoint's ``trainer_state.json`` (checked by :func:`check_resume_checkpoint`)."""
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as handle:
        return int(json.load(handle)["global_step"])


# ---------------------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


class OutputDirLock:
    """An exclusive lock on a training output dir (see the module docstring).

    Re-entrant within one process: the CLI holds it for the whole run and the trainer takes it
    again around ``train()``.

    Raises:
        OutputDirLockedError: from :meth:`acquire`, when another live process holds the lock; the
            message names its pid and host.
    """

    _held: dict[str, list[Any]] = {}  # realpath -> [fd, depth, pid]: this process's locks

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)

    def _key(self) -> str:
        return os.path.realpath(self.path)

    def acquire(self) -> None:
        key = self._key()
        held = self._held.get(key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            return
        os.makedirs(self.directory, exist_ok=True)
        import fcntl

        for _ in range(10):  # retried only when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise OutputDirLockedError(self._locked_message(holder)) from None
            except OSError as err:  # a filesystem without flock: fall back to the pid recorded in the file
                logger.warning("%s: flock is not supported here (%s); relying on the recorded pid only.", self.path, err)
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released (unlinked) it between our open and flock
                os.close(fd)
                continue
            previous = self._read(fd)
            if previous and previous.get("pid") != os.getpid():
                if previous.get("host") == socket.gethostname() and isinstance(previous.get("pid"), int) \
                        and _pid_alive(previous["pid"]):
                    os.close(fd)
                    raise OutputDirLockedError(self._locked_message(previous)
                                               + f" If no training runs there, delete {self.path}.")
                logger.warning("Taking over the stale lock %s left by %s, which is no longer running.",
                               self.path, _describe(previous))
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
            self._held[key] = [fd, 1, os.getpid()]
            return
        raise OutputDirLockedError(f"{self.path}: the lock file keeps being replaced; another training is starting there.")

    def release(self) -> None:
        key = self._key()
        held = self._held.get(key)
        if held is None or held[2] != os.getpid():
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del self._held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding the flock: a waiter re-checks the inode
        os.close(held[0])

    def _read(self, fd: int) -> dict[str, Any]:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            value = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _locked_message(self, holder: dict[str, Any]) -> str:
        return (f"{self.directory} is in use by another training ({_describe(holder)}; lock {self.path}): "
                "wait for it to finish or stop it, or pass another output dir")

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def hold_output_dir(directory: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """``with OutputDirLock(directory)`` when ``enabled`` (the process that saves), else nothing."""
    if not enabled:
        yield
        return
    with OutputDirLock(directory):
        yield


__all__ = [
    "LOCK_NAME",
    "OutputDirLock",
    "PARTIAL_SUFFIX",
    "as_write_error",
    "check_resume_checkpoint",
    "checkpoint_global_step",
    "checkpoint_step",
    "hold_output_dir",
    "inspect_checkpoint",
    "list_checkpoints",
    "newest_intact_checkpoint",
    "publish_checkpoint",
    "recover_checkpoints",
    "remove_partial_checkpoints",
    "remove_stale_temp_files",
    "rng_file_name",
    "rotate_checkpoints",
]
