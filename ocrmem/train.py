"""Train the adapter (``proj``) of a MEMModel on your JSONL chats or the built-in synthetic memory task.

    python -m ocrmem.train --output-dir runs/tiny --max-steps 2000
    python -m ocrmem.train --output-dir runs/chats --train-data train.jsonl [--eval-data eval.jsonl]

``--train-data``: one chat per line, ``{"messages": [{"role", "content"}]}`` or ShareGPT's
``{"conversations": [{"from", "value"}]}``; every assistant turn is one sample, trained on its reply
only (:mod:`ocrmem.chat_data`). Before training, a data summary is printed and written to
``OUTPUT_DIR/data_summary.json``; characters the font cannot draw stop the run (exit 2) unless
``--allow-missing-glyphs``. Evaluation (``--eval-steps N``, and always at the end) reports
``eval_loss`` and ``eval_memory_gain`` — reply loss with another row's pages minus with the row's
own (:mod:`ocrmem.evaluation`) — on ``--eval-data``, a held-out ``--eval-fraction`` of the rows,
or (synthetic task) ``--num-eval-examples`` fresh examples. ``--bf16`` / ``--fp16``: mixed
precision through the Trainer (fp16 needs a CUDA GPU).

Each example's fact ("My cat is called Luna.") lives only in the history, which is rendered to
pages and read through the frozen OCR encoder; the question is in the recent text and the answer
is trained on (:func:`ocrmem.data.synthetic_memory_examples`; ``--filler-turns`` unrelated turns
around the fact, default 0). Without ``--model-dir`` the tiny preset is written to
``OUTPUT_DIR/model_init`` first (random weights, a few MB, CPU-friendly), its LLM pre-trained for
``--reader-pretrain-steps`` steps to read memory slots (:mod:`ocrmem.reader_pretraining`): a
random frozen LLM gives ``proj`` nothing to steer. The defaults (2,000 steps of 8 rows, lr 3e-3)
are the tiny run's: its ``eval_memory_gain`` rises from ~0 to +0.5-1.8 nats over seeds 0-2,
after a plateau of a few hundred steps (``benchmarks/memgain/README.md``). An existing
``OUTPUT_DIR/model_init`` is reused as it is.

What ``OUTPUT_DIR`` holds afterwards:

* ``model.safetensors`` + ``config.json`` — the trained adapter; the config names the frozen LLM
  and OCR encoder by absolute path, so ``MEMModel.from_pretrained(OUTPUT_DIR)`` loads it as is
  (so do the ``checkpoint-N`` dirs);
* ``checkpoint-N/`` every ``--save-steps`` (adapter, optimizer, scheduler, RNG state,
  ``trainer_state.json``; written crash-safely, see :mod:`ocrmem.training`);
* ``trainer_state.json`` — HF's state with ``log_history`` (``loss``, ``grad_norm``,
  ``proj_grad_norm``, ``empty_memory_batches``; ``eval_loss``, ``eval_memory_gain``,
  ``eval_loss_own_memory``, ``eval_loss_shuffled_memory``, ``eval_memory_rows``);
* ``data_summary.json`` — with ``--train-data``: rows, samples, compressed share, pages per sample,
  characters dropped by ``max_pages``, samples longer than the LLM's positions, missing glyphs;
* ``loss_curve.png`` — loss per logged step, ``proj_grad_norm`` on a second axis.

Every step is watched by :class:`~ocrmem.callbacks.GradFlowCallback` (first-batch gradient-flow
diagnosis, NaN/inf loss, no gradient into ``proj``, loss plateau).

More than one process: ``torchrun --nproc_per_node 2 -m ocrmem.train ...`` trains with DDP (gloo on
CPU, NCCL on GPUs). Rows without compressed history give a zero-weighted loss on every trainable
parameter, so DDP sees every parameter used on every rank (``ddp_find_unused_parameters=False``)
even when one rank's batch has no history (``--empty-history-fraction`` makes that happen).

DeepSpeed: ``--deepspeed CONFIG.json`` (e.g. ``examples/ds_zero2_bf16.json``, the user's ZeRO-2
setup: per-device batch 2, accumulation 8, bf16 ``auto``) is passed to
``TrainingArguments(deepspeed=...)`` and needs a launcher — ``torchrun --nproc_per_node N -m
ocrmem.train ...`` or ``deepspeed --num_gpus N --module ocrmem.train ...``; without one it exits 2
saying so. ``"auto"`` values are filled from these arguments. ZeRO-2 and ZeRO-3 work, on GPUs and
on CPU (gloo; DeepSpeed's CPU shared-memory comm op is not compiled, see
:func:`ocrmem.training.skip_deepspeed_shm_comm`); keep the torch optimizer
(``"zero_force_ds_cpu_optimizer": false`` and no ``optimizer`` block) to avoid compiling
DeepSpeed's CPU/fused Adam. Under DeepSpeed the per-step gradient checks of GradFlowCallback are
off (gradients live in DeepSpeed's buffers); its first-batch diagnosis stays on, run so that it
cannot disturb the engine (see :mod:`ocrmem.callbacks`).

Multi-process runs end: every collective gives up after ``--ddp-timeout`` seconds, and the ranks
meet at a bounded final barrier before the process group is destroyed.

Resuming: ``--resume-from-checkpoint PATH|last`` reads every file of the checkpoint before anything
trains. A corrupt file, or a checkpoint without ``optimizer.pt`` / ``scheduler.pt`` / ``rng_state.pth``
(or the final output dir given instead of a checkpoint), exits 2 naming the file and the newest
intact checkpoint; ``--resume-partial`` resumes anyway and says what restarts (Adam state, LR
schedule, RNG). A checkpoint already at or past ``--max-steps``: the run says so, trains and writes
nothing, and exits 0 (rerunning a finished job is not an error).

One training per output dir: ``OUTPUT_DIR/.ocrmem-train.lock`` (pid and host of the holder) makes a
second one exit 2 naming the holder; a lock left by a dead process on this host is taken over with
a warning.

Exit status: 0 trained (or nothing left to train), 1 training stopped by a finding
(GradFlowCallback), 2 bad arguments or paths (including an output dir that cannot be written, a
full disk while saving, a corrupt or incomplete resume checkpoint, an output dir in use).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import OcrMemError

EXIT_OK = 0
EXIT_STOPPED = 1
EXIT_USAGE = 2

EPILOG = """\
examples:
  # tiny preset, CPU, 1-2 minutes (OMP_NUM_THREADS=1 on a busy machine); eval_memory_gain > 0 at the end
  python -m ocrmem.train --output-dir OUT --max-steps 2000

  # your chats (OpenAI/Qwen `messages` or ShareGPT `conversations`), evaluated every 100 steps, bf16
  python -m ocrmem.train --output-dir OUT --train-data examples/chats.jsonl examples/chats_sharegpt.jsonl \
      --eval-steps 100 --bf16

  # your own MEMModel dir (config.json naming the LLM and OCR dirs), the user's settings
  python -m ocrmem.train --model-dir /models/mem --output-dir OUT --batch-size 2 \\
      --grad-accum 8 --learning-rate 2e-4 --activation-checkpointing

  # two processes on CPU (gloo); rows without history on purpose
  torchrun --nproc_per_node 2 -m ocrmem.train --output-dir OUT --max-steps 50 \\
      --empty-history-fraction 0.5

  # resume after a crash from the last complete checkpoint
  python -m ocrmem.train --output-dir OUT --max-steps 300 --resume-from-checkpoint last

  # resume from a checkpoint without optimizer.pt/scheduler.pt, knowingly restarting them
  python -m ocrmem.train --output-dir OUT --max-steps 300 \
      --resume-from-checkpoint OUT/checkpoint-100 --resume-partial

  # DeepSpeed ZeRO-2, bf16, the user's 8-GPU setup (needs `pip install deepspeed`)
  torchrun --nproc_per_node 8 -m ocrmem.train --model-dir /models/mem --output-dir OUT \\
      --batch-size 2 --grad-accum 8 --learning-rate 2e-4 --deepspeed examples/ds_zero2_bf16.json

exit status: 0 trained (or nothing left to train), 1 stopped by a gradient-flow/NaN finding,
  2 bad arguments or paths, a corrupt/incomplete checkpoint, a full disk, an output dir in use.
wandb: --report-to wandb needs `pip install wandb`; WANDB_MODE=offline logs without network.
"""


# The tiny preset's synthetic run (no --model-dir, no --train-data); see benchmarks/memgain/README.md.
READER_PRETRAIN_STEPS = 150  # the preset's LLM learns to read slots: held-out slot loss 7.4 -> 0.01
SYNTHETIC_FILLER_TURNS = 0  # the fact alone on its page: linearly decodable from the random encoder's features


class UsageError(Exception):
    """A bad argument or path: exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ocrmem.train",
        description=(
            "Train only the projector (proj) of a MEMModel on a synthetic memory task: facts live in "
            "rendered history pages, questions in the recent text. Without --model-dir the tiny preset "
            "is written to OUTPUT_DIR/model_init and trained on CPU."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_argument_group("model and output")
    where.add_argument("--output-dir", required=True, metavar="DIR", help="where checkpoints, the adapter, trainer_state.json and loss_curve.png go")
    where.add_argument("--model-dir", metavar="DIR", help="a MEMModel dir (config.json [+ model.safetensors]); default: the tiny preset")
    where.add_argument("--reader-pretrain-steps", type=int, default=READER_PRETRAIN_STEPS, metavar="N",
                       help="without --model-dir: first pre-train the tiny preset's random LLM for N steps to read memory "
                            f"slots (ocrmem.reader_pretraining, ~5 s), so proj has a reader to steer; 0 = random LLM "
                            f"(default {READER_PRETRAIN_STEPS})")
    where.add_argument("--resume-from-checkpoint", metavar="PATH|last", help="resume from a checkpoint dir, or 'last' = the newest complete one in OUTPUT_DIR")
    where.add_argument("--resume-partial", action="store_true",
                       help="resume even from a checkpoint without optimizer.pt/scheduler.pt/rng_state.pth, restarting those (a warning says which)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=int, default=2000,
                     help="optimizer steps (default 2000: the tiny run's memory gain appears after ~500-1000 steps)")
    opt.add_argument("--learning-rate", type=float, default=3e-3,
                     help="peak learning rate, linear decay (default 3e-3, the tiny run's; the user's 8B run used 2e-4)")
    opt.add_argument("--batch-size", type=int, default=8, help="rows per device and micro-batch (default 8)")
    opt.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    opt.add_argument("--seed", type=int, default=0, help="seeds data, proj init and training (default 0)")
    opt.add_argument("--activation-checkpointing", action="store_true", help="checkpoint the LLM's layers (non-reentrant) to save memory")
    opt.add_argument("--deepspeed", metavar="CONFIG.json", help="DeepSpeed config passed to TrainingArguments (needs deepspeed and a launcher: torchrun or deepspeed); e.g. examples/ds_zero2_bf16.json")
    opt.add_argument("--ddp-timeout", type=int, default=1800, metavar="S",
                     help="seconds any collective of a multi-process run waits for the other ranks before failing (default 1800)")
    precision = opt.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 mixed precision through the Trainer (autocast; CPU or GPU)")
    precision.add_argument("--fp16", action="store_true", help="fp16 mixed precision through the Trainer (needs a CUDA GPU)")

    data = parser.add_argument_group("data")
    data.add_argument("--train-data", metavar="FILE.jsonl", nargs="+",
                      help='your chats, one JSON object per line: {"messages": [{"role", "content"}]} or ShareGPT\'s '
                           '{"conversations": [{"from", "value"}]}; every assistant turn is one sample (default: the synthetic task)')
    data.add_argument("--eval-data", metavar="FILE.jsonl", nargs="+", help="chats to evaluate on (default: --eval-fraction of --train-data's rows)")
    data.add_argument("--eval-fraction", type=float, default=0.05, metavar="F",
                      help="without --eval-data, hold out this fraction of --train-data's rows for evaluation; 0 = no evaluation (default 0.05)")
    data.add_argument("--skip-bad-lines", action="store_true", help="skip lines that cannot be trained on (and say how many, which) instead of stopping")
    data.add_argument("--allow-missing-glyphs", action="store_true", help="train even when the font lacks glyphs for some history characters")
    data.add_argument("--font", metavar="FONT.ttf", help="font the history pages are rendered with (default: the model config's, else a CJK-capable system font)")
    data.add_argument("--num-examples", type=int, default=512, help="synthetic examples, reused across epochs (default 512)")
    data.add_argument("--num-eval-examples", type=int, default=64, help="held-out synthetic examples evaluated on; 0 = no evaluation (default 64)")
    data.add_argument("--filler-turns", type=int, default=SYNTHETIC_FILLER_TURNS, metavar="N",
                      help="synthetic task: unrelated chat turns around the fact in each history (default "
                           f"{SYNTHETIC_FILLER_TURNS}: the fact alone on its page; with 6, the tiny preset's random frozen "
                           "encoder no longer carries the fact, so no proj can read it)")
    data.add_argument("--empty-history-fraction", type=float, default=0.0, metavar="F",
                      help="fraction of examples with no history at all (no pages: proj takes no part in such rows; default 0)")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader workers that render pages (default 0)")

    log = parser.add_argument_group("saving and logging")
    log.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps; 0 = only the final adapter (default 50)")
    log.add_argument("--save-total-limit", type=int, default=3, help="keep the newest N checkpoints (default 3)")
    log.add_argument("--logging-steps", type=int, default=10, help="log loss and proj_grad_norm every N steps (default 10)")
    log.add_argument("--eval-steps", type=int, default=0,
                     help="evaluate (eval_loss, eval_memory_gain) every N steps; 0 = at the end only (default 0)")
    log.add_argument("--eval-batch-size", type=int, default=8, help="rows per eval batch; memory is shuffled among a batch's rows (default 8)")
    log.add_argument("--patience", type=int, default=50, help="warn when the mean loss over N-step windows stops improving; 0 = never (default 50)")
    log.add_argument("--report-to", choices=("none", "wandb"), default="none", help="experiment tracker (default none)")
    log.add_argument("--save-rank-weights", action="store_true",
                     help="every process also writes its proj to OUTPUT_DIR/rank{R}.safetensors and its batch stats to rank{R}.json (to check DDP replicas)")
    return parser


def validate(opts: argparse.Namespace) -> None:
    """Raise :class:`UsageError` for anything wrong before any work starts."""
    positive = {"--max-steps": opts.max_steps, "--batch-size": opts.batch_size, "--grad-accum": opts.grad_accum,
                "--num-examples": opts.num_examples, "--logging-steps": opts.logging_steps,
                "--ddp-timeout": opts.ddp_timeout}
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}.")
    for flag, value in {"--save-steps": opts.save_steps, "--save-total-limit": opts.save_total_limit,
                        "--patience": opts.patience, "--num-workers": opts.num_workers,
                        "--reader-pretrain-steps": opts.reader_pretrain_steps, "--filler-turns": opts.filler_turns}.items():
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}.")
    if not (opts.learning_rate > 0 and math.isfinite(opts.learning_rate)):
        raise UsageError(f"--learning-rate must be a finite number > 0, got {opts.learning_rate}.")
    if not 0 <= opts.seed < 2**32:
        raise UsageError(f"--seed must be within [0, 2**32 - 1] (numpy's range), got {opts.seed}.")
    if not opts.output_dir.strip():
        raise UsageError("--output-dir is empty: pass a directory (it is created if missing).")
    if Path(opts.output_dir).exists() and not Path(opts.output_dir).is_dir():
        raise UsageError(f"--output-dir {opts.output_dir} is a file, not a directory: pass a directory (it is created if missing).")
    if opts.resume_partial and opts.resume_from_checkpoint is None:
        raise UsageError("--resume-partial needs --resume-from-checkpoint PATH|last.")
    for flag, value in {"--eval-steps": opts.eval_steps, "--num-eval-examples": opts.num_eval_examples}.items():
        if value < 0:
            raise UsageError(f"--{flag.lstrip('-')} must be >= 0, got {value}.")
    if opts.eval_batch_size < 2:
        raise UsageError(f"--eval-batch-size must be at least 2 (memory is shuffled between rows), got {opts.eval_batch_size}.")
    if not 0.0 <= opts.eval_fraction < 1.0:
        raise UsageError(f"--eval-fraction must be within [0, 1), got {opts.eval_fraction}.")
    for flag, values in {"--train-data": opts.train_data, "--eval-data": opts.eval_data, "--font": [opts.font] if opts.font else None}.items():
        for value in values or []:
            if not Path(value).is_file():
                raise UsageError(f"{flag} {value}: no such file.")
    if opts.eval_data is not None and opts.train_data is None:
        raise UsageError("--eval-data needs --train-data (the synthetic task makes its own eval examples).")
    if opts.fp16:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--fp16 needs a CUDA GPU (the Trainer's fp16 loss scaling does not run on CPU); use --bf16 on CPU.")
    if not 0.0 <= opts.empty_history_fraction <= 1.0:
        raise UsageError(f"--empty-history-fraction must be within [0, 1], got {opts.empty_history_fraction}.")
    if opts.model_dir is not None:
        model_dir = Path(opts.model_dir)
        if not (model_dir / "config.json").is_file():
            raise UsageError(f"--model-dir {model_dir}: no config.json there — not a MEMModel dir (python -m ocrmem.tiny DIR writes one).")
    if opts.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UsageError("--report-to wandb needs wandb: pip install wandb (and WANDB_MODE=offline to log without network).")
    if opts.deepspeed is not None:
        config = Path(opts.deepspeed)
        if not config.is_file():
            raise UsageError(f"--deepspeed {config}: {'a directory, not a' if config.is_dir() else 'no such'} file; pass a DeepSpeed JSON config.")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"--deepspeed {config} is not valid JSON ({err}).") from err
        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError("--deepspeed needs DeepSpeed: pip install deepspeed.")
        check_launcher(os.environ)


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def check_launcher(environ: Any) -> None:
    """DeepSpeed without a launcher would try MPI discovery and die on a missing ``mpi4py``."""
    missing = [name for name in LAUNCHER_ENV if name not in environ]
    if missing:
        raise UsageError(
            f"--deepspeed needs a launcher ({', '.join(missing)} not set): run "
            "`torchrun --nproc_per_node N -m ocrmem.train ... --deepspeed CONFIG` or "
            "`deepspeed --num_gpus N --module ocrmem.train ... --deepspeed CONFIG` (N = processes; 1 is fine)."
        )


def check_writable(path: Path) -> None:
    """Create ``path`` and prove a file can be written there (fail early, not after an hour)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"--output-dir {path} is not writable: {err.strerror or err}.") from err


def training_arguments(opts: argparse.Namespace, output_dir: Path) -> Any:
    """The ``TrainingArguments`` for these options (CPU: gloo for DDP; a GPU when one is visible)."""
    import torch
    from transformers import TrainingArguments

    from . import compat

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=opts.max_steps,
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.learning_rate,
        seed=opts.seed,
        data_seed=opts.seed,
        save_strategy="steps" if opts.save_steps else "no",
        save_steps=opts.save_steps or 500,
        save_total_limit=opts.save_total_limit or None,
        logging_steps=opts.logging_steps,
        logging_first_step=True,
        report_to=[] if opts.report_to == "none" else [opts.report_to],
        disable_tqdm=False,
        remove_unused_columns=False,  # examples are dicts of text; the collator needs every key
        dataloader_num_workers=opts.num_workers,
        dataloader_pin_memory=cuda,
        # Every trainable param takes part in every loss (the skip loss on batches without memory),
        # so DDP need not search the graph for unused ones — and an error would say if one were.
        ddp_find_unused_parameters=False,
        bf16=opts.bf16,
        fp16=opts.fp16,
        per_device_eval_batch_size=opts.eval_batch_size,
        eval_strategy="steps" if opts.eval_steps else "no",
        eval_steps=opts.eval_steps or None,
        **compat.training_args_checkpointing(opts.activation_checkpointing),
    )
    if not cuda:
        kwargs["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: DDP over gloo
            kwargs["ddp_backend"] = "gloo"
    # Every collective of the process group (and the final barrier) gives up after this long
    # instead of waiting for a peer that has gone (HF's default is 30 minutes).
    kwargs["ddp_timeout"] = opts.ddp_timeout
    if opts.deepspeed is not None:
        from .training import skip_deepspeed_shm_comm

        skip_deepspeed_shm_comm()  # before TrainingArguments starts DeepSpeed's comm backend
        kwargs["deepspeed"] = str(Path(opts.deepspeed).resolve())
    return TrainingArguments(**kwargs)


def build_examples(n: int, seed: int, empty_fraction: float,
                   filler_turns: int = SYNTHETIC_FILLER_TURNS) -> list[dict[str, str]]:
    """The synthetic memory task (``filler_turns`` unrelated turns around each fact); a seeded
    ``empty_fraction`` of the rows get no history at all."""
    from .data import synthetic_memory_examples

    examples = synthetic_memory_examples(n, seed=seed, filler_turns=filler_turns)
    rng = random.Random(seed + 1)
    for example in examples:
        if rng.random() < empty_fraction:
            example["history"] = ""
    return examples


EVAL_SEED_OFFSET = 10_000  # the synthetic eval examples come from another random stream than the training ones
DATA_SUMMARY_NAME = "data_summary.json"


def build_chat_data(opts: argparse.Namespace, model: Any, output_dir: Path,
                    main_process: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """Read ``--train-data`` / ``--eval-data``, print and write the data summary, refuse missing glyphs.

    Returns:
        ``(train_samples, eval_samples, collator)``.

    Raises:
        UsageError: A bad line (``file:line`` and the field), no sample, or glyphs the font lacks
            (without ``--allow-missing-glyphs``).
    """
    from .chat_data import ChatCollator, chat_samples, format_summary, read_chats, split_rows, summarize
    from .errors import ChatDataError

    try:
        train_files = [read_chats(path, skip_bad_lines=opts.skip_bad_lines) for path in opts.train_data]
        eval_files = [read_chats(path, skip_bad_lines=opts.skip_bad_lines) for path in opts.eval_data or []]
    except ChatDataError as err:
        raise UsageError(f"{err} (--skip-bad-lines leaves such lines out)" if not opts.skip_bad_lines else str(err)) from err
    for chat_file in train_files + eval_files:
        if chat_file.skipped and main_process:
            print(chat_file.skipped_message(), file=sys.stderr)
    train_chats = [chat for f in train_files for chat in f.chats]
    if eval_files:
        eval_chats = [chat for f in eval_files for chat in f.chats]
    else:
        train_chats, eval_chats = split_rows(train_chats, opts.eval_fraction, opts.seed)
    collator = ChatCollator.for_model(model)
    common = dict(max_pages=model.config.max_pages, tokens_per_page=model.tokens_per_page,
                  max_positions=getattr(model.base_llm.config, "max_position_embeddings", None))
    summary: dict[str, Any] = {"version": 1, "train": summarize(train_files, train_chats, collator.tokens, collator.renderer, **common)}
    if eval_chats:
        summary["eval"] = summarize(eval_files, eval_chats, collator.tokens, collator.renderer, **common)
        if not eval_files:
            summary["eval"]["held_out_from"] = [str(f.path) for f in train_files]
    if main_process:
        for name in ("train", "eval"):
            if name in summary:
                print(format_summary(name, summary[name]), file=sys.stderr)
        tmp = output_dir / f".{DATA_SUMMARY_NAME}.tmp"
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, output_dir / DATA_SUMMARY_NAME)
    missing = sum(summary[n]["glyphs"]["missing_chars"] for n in ("train", "eval") if n in summary)
    if missing and not opts.allow_missing_glyphs:
        examples = sorted({c for n in ("train", "eval") if n in summary for c in summary[n]["glyphs"]["missing_examples"]})
        raise UsageError(
            f"{missing:,} history characters (e.g. {''.join(examples[:8])!r}) have no glyph in the font "
            f"{collator.renderer.font_path}: their pages would be empty boxes the OCR encoder cannot read. "
            "Install a CJK font (`apt-get install -y fonts-wqy-microhei`) or pass --font FONT.ttf; "
            "--allow-missing-glyphs trains anyway."
        )
    samples = chat_samples(train_chats)
    if not samples:
        raise UsageError(f"--train-data {' '.join(opts.train_data)}: no assistant turn left to train on.")
    return samples, chat_samples(eval_chats), collator


def ensure_model_dir(opts: argparse.Namespace, output_dir: Path) -> Path:
    """``--model-dir``, or the tiny preset in ``OUTPUT_DIR/model_init`` (written once)."""
    if opts.model_dir is not None:
        return Path(opts.model_dir).resolve()
    from .tiny import write_tiny

    model_dir = output_dir / "model_init"
    if not (model_dir / "config.json").is_file():  # config.json is written last: its presence = complete
        write_tiny(model_dir, seed=opts.seed, reader_pretrain_steps=opts.reader_pretrain_steps)
    return model_dir


def load_model(model_dir: Path, font: str | None = None) -> Any:
    """Load the MEMModel and make its config name the LLM and OCR dirs by absolute path, so every
    checkpoint and the final adapter dir load from anywhere. ``font`` overrides ``font_path``."""
    from .modeling import MEMModel, resolve_model_path

    overrides = {"font_path": str(Path(font).resolve())} if font else {}
    model = MEMModel.from_pretrained(model_dir, **overrides)
    config = model.config
    config.base_model_name = str(resolve_model_path(config.base_model_name, "base_model_name", model_dir).resolve())
    config.ocr_model_name = str(resolve_model_path(config.ocr_model_name, "ocr_model_name", model_dir).resolve())
    return model


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss per logged step (and ``proj_grad_norm`` on a second axis) as a PNG; ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logging.getLogger(__name__).warning("matplotlib is not installed: no %s (pip install matplotlib).", path.name)
        return None
    rows = [h for h in log_history if "loss" in h and "step" in h]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg: no display needed
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], color="tab:blue", marker=".", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    grads = [h for h in rows if "proj_grad_norm" in h]
    if grads:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in grads], [h["proj_grad_norm"] for h in grads], color="tab:orange", alpha=0.7, label="proj_grad_norm")
        ax2.set_ylabel("proj gradient norm", color="tab:orange")
    ax.set_title("adapter-only training")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def resolve_resume(value: str | None, output_dir: Path, allow_partial: bool) -> str | None:
    """The checkpoint to resume from, every file of it read (:func:`~ocrmem.checkpointing.check_resume_checkpoint`).

    Raises:
        UsageError: not a checkpoint dir.
        CheckpointError: corrupt or (without ``allow_partial``) incomplete; names the intact one.
    """
    if value is None:
        return None
    from .checkpointing import check_resume_checkpoint, rng_file_name

    if value == "last":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            print(f"--resume-from-checkpoint last: no checkpoint in {output_dir}, starting from scratch.", file=sys.stderr)
            return None
        path = last
    else:
        if not Path(value).is_dir():
            raise UsageError(f"--resume-from-checkpoint {value}: not a checkpoint dir ({'a file' if Path(value).exists() else 'no such dir'}); "
                             "pass OUTPUT_DIR/checkpoint-N or 'last'.")
        path = str(Path(value).resolve())
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    check_resume_checkpoint(path, allow_partial=allow_partial, rng_file=rng_file_name(world_size, rank),
                            model_state_only=is_deepspeed_checkpoint(path), warn=False)  # the trainer warns
    return path


def is_deepspeed_checkpoint(path: str) -> bool:
    """A DeepSpeed checkpoint keeps optimizer and model state in ``global_stepN/`` (checked by DeepSpeed)."""
    return any(p.name.startswith("global_step") for p in Path(path).iterdir() if p.is_dir())


def nothing_to_train(resume: str | None, max_steps: int) -> bool:
    """Say so when the resume checkpoint is already at or past ``--max-steps``."""
    from .checkpointing import checkpoint_global_step

    if resume is None:
        return False
    step = checkpoint_global_step(resume)
    if step < max_steps:
        return False
    print(f"nothing to train: {resume} is at step {step} and --max-steps is {max_steps}; nothing was trained or "
          f"written. Pass --max-steps above {step} to train further.", file=sys.stderr)
    return True


def save_rank_weights(trainer: Any, model: Any, callback: Any, output_dir: Path) -> None:
    """``rank{R}.safetensors`` (this process's proj) and ``rank{R}.json`` (its batch stats)."""
    from safetensors.torch import save_file

    from .training import gather_trainable_state_dict

    rank = trainer.args.process_index
    # Every rank calls the gather (a collective under ZeRO-3, where each holds a shard).
    save_file(gather_trainable_state_dict(model), str(output_dir / f"rank{rank}.safetensors"))
    stats = {k: v for k, v in callback.stats.items()}
    stats["world_size"] = trainer.args.world_size
    (output_dir / f"rank{rank}.json").write_text(json.dumps(stats), encoding="utf-8")


def format_loss_change(step_losses: list[tuple[int, float]], world_size: int = 1) -> str:
    """``loss 7.2202 (step 1) -> 6.9911 (step 200)`` from the callback's per-step losses (every step
    this run trained, not only the logged ones; this process's batches when there are several)."""
    if not step_losses:
        return "no step finished"
    (first_step, first), (last_step, last) = step_losses[0], step_losses[-1]
    where = ", this rank's batches" if world_size > 1 else ""
    if first_step == last_step:
        return f"loss {first:.4f} (step {first_step}{where})"
    return f"loss {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step}{where})"


def finish(trainer: Any, output_dir: Path, *, save_adapter: bool) -> dict[str, Any]:
    """Write the final adapter, ``trainer_state.json`` and the loss curve (main process only)."""
    if save_adapter:
        trainer.save_model(str(output_dir))
    if not trainer.is_world_process_zero():
        return {}
    state_file = output_dir / "trainer_state.json"
    tmp = state_file.with_name(f".{state_file.name}.{os.getpid()}.tmp")
    trainer.state.save_to_json(str(tmp))
    os.replace(tmp, state_file)
    curve = plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
    return {"curve": curve}


def run(opts: argparse.Namespace) -> int:
    output_dir = Path(opts.output_dir).resolve()
    resume = resolve_resume(opts.resume_from_checkpoint, output_dir, opts.resume_partial)
    if nothing_to_train(resume, opts.max_steps):
        return EXIT_OK
    check_writable(output_dir)
    from .checkpointing import hold_output_dir

    # Rank 0 only (RANK is set by torchrun before the process group exists); under torchrun the
    # other ranks are stopped by torchrun when rank 0 exits 2.
    with hold_output_dir(output_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        if opts.resume_from_checkpoint == "last" and int(os.environ.get("RANK", "0")) == 0:
            from .checkpointing import recover_checkpoints

            if recover_checkpoints(str(output_dir)):  # an interrupted save had set the newest aside
                resume = resolve_resume("last", output_dir, opts.resume_partial)
        return run_locked(opts, output_dir, resume)


def run_locked(opts: argparse.Namespace, output_dir: Path, resume: str | None) -> int:
    """Build the model and trainer and train (the output dir is locked)."""
    if int(os.environ.get("RANK", "0")) == 0:  # first output before the heavy imports (seconds)
        print(f"python -m ocrmem.train: training into {output_dir}; importing torch and transformers ...",
              file=sys.stderr, flush=True)
    try:
        args = training_arguments(opts, output_dir)
    except (ValueError, ImportError) as err:
        raise UsageError(f"invalid training arguments: {err}") from err

    from transformers import set_seed

    from .callbacks import GradFlowCallback, RunStepsCallback
    from .data import MemoryCollator
    from .training import AdapterOnlyTrainer, without_zero3_init

    main_process = args.process_index == 0
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ocrmem").setLevel(logging.INFO if main_process else logging.WARNING)
    with without_zero3_init():  # see ocrmem.training.without_zero3_init
        with args.main_process_first(desc="writing the tiny preset"):
            model_dir = ensure_model_dir(opts, output_dir)
        set_seed(opts.seed)
        try:
            model = load_model(model_dir, font=opts.font)
        except (FileNotFoundError, ValueError) as err:  # ConfigError / CheckpointError are ValueErrors
            raise UsageError(f"cannot load the model from {model_dir}: {err}") from err
    if main_process:
        print(model.parameter_report(), file=sys.stderr)

    if opts.train_data is not None:
        train_dataset, eval_dataset, collator = build_chat_data(opts, model, output_dir, main_process)
    else:
        from .data import synthetic_memory_examples

        train_dataset = build_examples(opts.num_examples, opts.seed, opts.empty_history_fraction, opts.filler_turns)
        eval_dataset = synthetic_memory_examples(opts.num_eval_examples, seed=opts.seed + EVAL_SEED_OFFSET,
                                                 filler_turns=opts.filler_turns)
        collator = MemoryCollator.for_model(model)
    if opts.eval_steps and not eval_dataset:
        raise UsageError("--eval-steps needs eval data: --eval-data, a non-zero --eval-fraction, or --num-eval-examples.")

    from .evaluation import memory_gain_metrics

    callback = GradFlowCallback(patience=opts.patience)
    trainer = AdapterOnlyTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset or None,
        data_collator=collator,
        compute_metrics=memory_gain_metrics if eval_dataset else None,
        callbacks=[callback, RunStepsCallback()],
        allow_partial_resume=opts.resume_partial,
    )
    try:
        return train_and_report(trainer, model, callback, opts, output_dir, resume)
    finally:
        shutdown_distributed()


def train_and_report(trainer: Any, model: Any, callback: Any, opts: argparse.Namespace, output_dir: Path,
                     resume: str | None) -> int:
    """Train, write the outputs, print the summary; the exit status."""
    from .callbacks import RunStepsCallback, TrainingStopped

    args = trainer.args
    main_process = args.process_index == 0
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        finish(trainer, output_dir, save_adapter=False)  # keep the log up to the stop; the adapter is not saved
        return EXIT_STOPPED
    elapsed = time.perf_counter() - started
    metrics = final_evaluation(trainer)
    summary = finish(trainer, output_dir, save_adapter=True)
    if opts.save_rank_weights:
        save_rank_weights(trainer, model, callback, output_dir)
    if main_process:
        weights = output_dir / "model.safetensors"
        checkpoints = sorted((p.name for p in output_dir.glob("checkpoint-*")), key=lambda n: int(n.rsplit("-", 1)[-1]))
        steps = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RunStepsCallback))
        resumed = f" (resumed at step {steps.start_step}, now at {trainer.state.global_step})" if steps.start_step else ""
        print(
            f"trained {steps.trained(trainer.state)} steps{resumed} in {elapsed:.0f} s on {args.device} "
            f"(world size {args.world_size}): {format_loss_change(callback.stats.get('step_losses', []), args.world_size)}\n"
            f"{format_eval(metrics)}"
            f"adapter: {weights} ({weights.stat().st_size:,} bytes) + config.json "
            f"(loads with MEMModel.from_pretrained({str(output_dir)!r}))\n"
            f"checkpoints: {', '.join(checkpoints) or 'none'}\n"
            f"log: {output_dir / 'trainer_state.json'}; loss curve: {summary['curve'] or 'not drawn'}",
            file=sys.stderr,
        )
    return EXIT_OK


def final_evaluation(trainer: Any) -> dict[str, float] | None:
    """``trainer.evaluate()`` unless the last logged evaluation is of the final step already."""
    if trainer.eval_dataset is None:
        return None
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        return {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()


def format_eval(metrics: dict[str, float] | None) -> str:
    """The summary line of the final evaluation."""
    if not metrics:
        return "evaluation: none (no eval data)\n"
    line = f"evaluation: eval_loss {metrics['eval_loss']:.4f}"
    if "eval_memory_gain" in metrics:
        line += (
            f", eval_memory_gain {metrics['eval_memory_gain']:+.4f} (reply loss with another row's pages "
            f"{metrics['eval_loss_shuffled_memory']:.4f} - with its own {metrics['eval_loss_own_memory']:.4f}, "
            f"{int(metrics['eval_memory_rows'])} rows)"
        )
    else:
        line += ", eval_memory_gain not measured (no eval batch had two rows with pages)"
    return line + "\n"


SHUTDOWN_BARRIER_S = 120  # the ranks' last meeting; they all finished training by then


def shutdown_distributed(timeout_s: float = SHUTDOWN_BARRIER_S) -> None:
    """Meet the other ranks once more, with a bound, then tear the process group down.

    A gloo group left to the interpreter's exit can abort the process ("terminate called without
    an active exception"), and a rank that destroys its group while a peer still has work in
    flight can leave that peer waiting in gloo for good. So every rank first passes a barrier
    that gives up after ``timeout_s`` (``monitored_barrier`` on gloo names the missing rank),
    and only then destroys the group; a rank whose peers never arrive logs that and exits
    without waiting further.
    """
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            dist.barrier()  # bounded by the group's timeout (--ddp-timeout)
    except Exception as err:  # a peer died or hangs: do not wait for it in destroy either
        logging.getLogger(__name__).error("final barrier failed (%s); exiting without waiting for the other ranks.", err)
        return
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    try:
        validate(opts)
        return run(opts)
    except (UsageError, OcrMemError) as err:  # OcrMemError: corrupt checkpoint, output dir in use
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # disk full / permissions while training or saving: a path problem
        # On a line of its own: the progress bar of the interrupted training has no newline yet.
        print(f"\n{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


__all__ = ["EXIT_OK", "EXIT_STOPPED", "EXIT_USAGE", "build_parser", "main", "plot_loss_curve"]

if __name__ == "__main__":
    sys.exit(main())
