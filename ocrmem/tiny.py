"""Tiny preset: a complete, loadable MEMModel directory written in seconds with no network.

    python -m ocrmem.tiny DIR

writes::

    DIR/llm/   a tiny Qwen3 causal LM (Qwen2 on transformers < 4.51) + a locally trained
               byte-level BPE tokenizer with Qwen's chat special tokens
    DIR/ocr/   a tiny DeepEncoder in DeepSeek-OCR's checkpoint layout
    DIR/       config.json + proj weights: loadable with MEMModel.from_pretrained(DIR)

Every weight is random (seeded); shapes follow the real models at toy widths, so the same code
paths run as at full size. Used by the tests and as every CLI's embedded default.

``--reader-pretrain-steps N`` (``write_tiny(..., reader_pretrain_steps=N)``) first teaches the
random LLM to read memory slots (:mod:`ocrmem.reader_pretraining`; N = 150 takes ~5 s on one CPU
core): a frozen *random* LLM gives a trainable proj nothing to steer, so adapter-only training on
it cannot make the replies depend on the pages. ``python -m ocrmem.train`` writes its preset this
way. Off by default, so the default weights (and the golden values the tests hold) stay as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from .fileio import default_file_mode

# torch, transformers and the model modules are imported inside write_tiny (fileio is
# torch-free): `python -m ocrmem.tiny --help` and a bad argument answer before seconds of imports.

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]
TINY_VOCAB = 1024  # byte-level BPE merges; the 4 specials come after (ids 1024..1027)
TINY_LLM = dict(  # Qwen3-8B's structure at toy width: GQA 4/2 heads, untied embeddings
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    # Random weights at HF's default std (0.02) give near-uniform attention, so a trainable proj
    # can barely steer the frozen LLM; 0.1 makes it peaky enough to overfit a batch in 30 steps.
    initializer_range=0.1,
)
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who its now find long down day "
    "did get come made may part cat dog name city color remember favourite lives blue red green Paris Tokyo"
).split()
_CJK = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你说年看好家去过天下子得着记住名字猫"


def build_tiny_tokenizer(seed: int = 0):
    """Train a byte-level BPE tokenizer (1,024 merges + Qwen's special tokens) on a built-in corpus.

    Byte-level, so any text — Chinese included — round-trips through encode/decode, which the
    seed path relies on (it decodes history back to text to render it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [
        " ".join(rng.choice(_WORDS) for _ in range(12)) + " " + "".join(rng.choice(_CJK) for _ in range(8)) + f" {rng.randrange(10000)}."
        for _ in range(2000)
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|image_pad|>"],
    )
    fast.padding_side = "left"
    return fast


def write_tiny(
    path: str | Path,
    seed: int = 0,
    readout: str = "tokens_plus_clip",
    context_threshold: int = 64,
    reader_pretrain_steps: int = 0,
    **config_kwargs,
) -> Path:
    """Write the tiny preset (LLM, OCR encoder, MEMModel) under ``path``.

    Args:
        path: Target directory (created; existing files are overwritten).
        seed: Seeds every random weight, so two calls give identical directories.
        readout: Encoder read-out of the MEMModel (``tokens_plus_clip`` or ``deepseek_ocr``).
        context_threshold: Tiny default 64 tokens so short synthetic histories get compressed.
        reader_pretrain_steps: When > 0, pre-train the LLM for that many steps to read memory
            slots (:func:`~ocrmem.reader_pretraining.pretrain_reader`, seeded by ``seed``, batch
            ``READER_PRETRAIN_BATCH_SIZE``, peak lr ``READER_PRETRAIN_LR``) before it is saved;
            ``llm/reader_pretraining.json`` records the settings and the losses. 0 (default):
            the LLM keeps its random weights, bit-identical to earlier versions.
        **config_kwargs: Further :class:`MEMConfig` fields.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: ``reader_pretrain_steps`` is not an int >= 0.
    """
    if not isinstance(reader_pretrain_steps, int) or isinstance(reader_pretrain_steps, bool) or reader_pretrain_steps < 0:
        from .errors import ConfigError

        raise ConfigError(f"write_tiny: `reader_pretrain_steps` is {reader_pretrain_steps!r}; use an int >= 0 (0 = off).")
    import torch

    from . import compat
    from .configuration import MEMConfig
    from .encoder import DeepEncoder, DeepEncoderSpec, save_deepencoder
    from .modeling import MEMModel
    from .validation import output_dir

    root = output_dir(path, "write_tiny")
    tokenizer = build_tiny_tokenizer(seed)

    config_cls, model_cls = compat.tiny_llm_classes()
    llm_config = config_cls(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **TINY_LLM,
    )
    torch.manual_seed(seed)
    llm = model_cls(llm_config)
    with compat.quiet_progress():
        llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")

    torch.manual_seed(seed + 1)
    encoder = DeepEncoder(DeepEncoderSpec.tiny(), readout="deepseek_ocr")
    save_deepencoder(encoder, root / "ocr")

    torch.manual_seed(seed + 2)
    config = MEMConfig(
        base_model_name="llm",
        ocr_model_name="ocr",
        encoder_readout=readout,
        context_threshold=context_threshold,
        **config_kwargs,
    )
    with _loader_info_muted():  # whoever loads this directory next hears them then, once
        model = MEMModel(config, model_dir=root)
    if reader_pretrain_steps:
        _pretrain_reader(model, root / "llm", reader_pretrain_steps, seed)
    model.save_pretrained(root)
    _make_readable([*(root / "llm").iterdir(), *(root / "ocr").iterdir()])
    return root


@contextlib.contextmanager
def _loader_info_muted() -> Iterator[None]:
    """The encoder loader's INFO lines (keys not loaded, read-out, normalisation) off for a while."""
    logger = logging.getLogger("ocrmem.encoder")
    level = logger.level
    logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        logger.setLevel(level)


READER_PRETRAIN_BATCH_SIZE = 16  # 150 x 16 rows: held-out slot-reading loss 7.4 -> 0.01 (benchmarks/memgain)
READER_PRETRAIN_LR = 3e-3
READER_PRETRAIN_MAX_PAGES = 2  # rows get 1-2 pages of slots; the synthetic task's histories fill one
READER_PRETRAINING_FILE = "reader_pretraining.json"


def _pretrain_reader(model, llm_dir: Path, steps: int, seed: int) -> None:
    """Pre-train ``model.base_llm`` to read memory slots and save it over ``llm_dir``'s weights."""
    import json

    from . import compat
    from .reader_pretraining import pretrain_reader

    result = pretrain_reader(
        model.base_llm, model.tokenizer, steps=steps, batch_size=READER_PRETRAIN_BATCH_SIZE,
        learning_rate=READER_PRETRAIN_LR, seed=seed, tokens_per_page=model.tokens_per_page,
        max_pages=READER_PRETRAIN_MAX_PAGES, memory_token=model.config.memory_token,
    )
    with compat.quiet_progress():
        model.base_llm.save_pretrained(llm_dir)
    record = {"version": 1, "steps": result.steps, "batch_size": result.batch_size,
              "learning_rate": result.learning_rate, "seed": result.seed, "max_pages": READER_PRETRAIN_MAX_PAGES,
              "first_loss": result.first_loss, "last_loss": result.last_loss}
    (llm_dir / READER_PRETRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _make_readable(files: list[Path]) -> None:
    """Give the files the preset wrote the mode ``open()`` would (0644 under umask 022).

    safetensors (>= 0.6) writes 0600 whatever the umask, and so do writes through ``mkstemp``;
    a model directory should read like any other files (shared caches, containers, other users).
    """
    mode = default_file_mode()
    for file in files:
        if file.is_file():
            file.chmod(mode)


EXIT_OK = 0
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    """``python -m ocrmem.tiny DIR``; returns the exit status (0 written, 2 bad arguments or DIR)."""
    parser = argparse.ArgumentParser(
        prog="python -m ocrmem.tiny",
        description="Write the tiny OCR-memory preset (random weights, no network) into DIR.",
        epilog="Then: MEMModel.from_pretrained(DIR), or python -m diagnostics.grad_flow DIR\n\n"
        "exit status: 0 written; 2 bad arguments, or DIR cannot be written (one line on stderr says why).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", help="output directory (DIR/llm, DIR/ocr and the MEMModel itself in DIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random weight (default 0)")
    parser.add_argument(
        "--readout", choices=("tokens_plus_clip", "deepseek_ocr"), default="tokens_plus_clip",
        help="encoder read-out: the user's package (tokens_plus_clip) or DeepSeek-OCR's own",
    )
    parser.add_argument(
        "--reader-pretrain-steps", type=int, default=0, metavar="N",
        help="first pre-train the random LLM for N steps to read memory slots (150: ~5 s on one core; "
             "python -m ocrmem.train's preset uses 150), so a proj trained on top can make the replies "
             "depend on the pages; 0 = random LLM (default 0)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    if args.reader_pretrain_steps < 0:
        print(f"{parser.prog}: error: --reader-pretrain-steps must be >= 0, got {args.reader_pretrain_steps}", file=sys.stderr)
        return EXIT_USAGE
    target = Path(args.dir)
    blocker = next((p for p in (target, *target.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        print(f"{parser.prog}: error: `{blocker}` is a file, so DIR `{target}` cannot be created there; "
              "give a new or existing directory", file=sys.stderr)
        return EXIT_USAGE
    print(f"writing the tiny MEMModel to {target}/ ...", file=sys.stderr, flush=True)
    from .errors import OcrMemError

    try:
        root = write_tiny(target, seed=args.seed, readout=args.readout, reader_pretrain_steps=args.reader_pretrain_steps)
    except OSError as err:
        print(f"{parser.prog}: error: cannot write `{target}`: {err.strerror or err}; "
              "give a directory you can write to", file=sys.stderr)
        return EXIT_USAGE
    except OcrMemError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote tiny MEMModel to {root}/ (llm/, ocr/, config.json, model.safetensors)")
    return EXIT_OK


__all__ = [
    "EXIT_OK",
    "EXIT_USAGE",
    "READER_PRETRAIN_BATCH_SIZE",
    "READER_PRETRAIN_LR",
    "SPECIAL_TOKENS",
    "TINY_LLM",
    "build_tiny_tokenizer",
    "main",
    "write_tiny",
]

if __name__ == "__main__":
    sys.exit(main())
