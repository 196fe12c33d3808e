"""Training data: a default corpus that needs no download, token files, per-rank shards.

Tokens are bytes (vocabulary 256) for text, or uint16 ids for pre-tokenized ``.bin`` files
(the nanoGPT layout: a flat array of little-endian uint16 token ids, no header).

Sources (`load_dataset`):

- ``None`` — the default corpus: the Python standard library's own sources (the
  ``sysconfig`` stdlib path), files in sorted path order, without tests, site-packages and
  generated tables, bounded to `corpus_bytes`. Every 10th file goes to validation, so both
  splits come from the same distribution and the split depends on nothing but the files.
- a text file — its bytes; the last 10 % is validation.
- a ``.bin`` file — uint16 tokens; the last 10 % is validation. A directory holding
  ``train.bin`` and ``val.bin`` uses those two files as the splits.

Sharding: the train split is cut into `world_size` contiguous shards and rank r samples its
sequences from shard r only (``.bin`` and text files are memory-mapped, so a rank touches
only its own pages). `BatchSampler` draws random windows from the shard; batch i depends only
on (seed, rank, i), so its state is one integer (`position`) — exact resume is trivial.
"""
from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VAL_EVERY_NTH_FILE = 10
VAL_FRACTION = 0.1
DEFAULT_CORPUS_BYTES = 4 << 20

# Directories of the standard library that are not representative source text (tests carry
# odd encodings and huge data literals; encodings/ are generated code tables) or not part of
# the standard library at all (site-packages).
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                  "encodings", "lib2to3", "turtledemo", "idlelib"}


@dataclass
class Dataset:
    """Train and validation token arrays (numpy, possibly memory-mapped) and the vocabulary."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str

    def shard(self, rank: int, world_size: int) -> np.ndarray:
        """Rank `rank`'s contiguous share of the train split."""
        n = len(self.train)
        return self.train[rank * n // world_size:(rank + 1) * n // world_size]


def stdlib_source_files() -> list[Path]:
    """The standard library's .py files in a deterministic (sorted relative path) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):  # machine-specific build configuration
            continue
        files.append(rel)
    return [root / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def stdlib_corpus(corpus_bytes: int = DEFAULT_CORPUS_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) byte tokens of the standard library sources, about `corpus_bytes` in all."""
    if corpus_bytes < 1:
        raise ValueError(f"corpus_bytes must be >= 1, got {corpus_bytes}")
    train_parts, val_parts, total = [], [], 0
    for index, path in enumerate(stdlib_source_files()):
        if total >= corpus_bytes:
            break
        data = path.read_bytes()[:corpus_bytes - total]
        total += len(data)
        is_val = index % VAL_EVERY_NTH_FILE == VAL_EVERY_NTH_FILE - 1
        (val_parts if is_val else train_parts).append(data)
    if not train_parts or not val_parts:
        raise ValueError("the standard library corpus is too small: raise --corpus-bytes")
    as_tokens = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)  # noqa: E731
    return as_tokens(train_parts), as_tokens(val_parts)


def _max_token(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))


def load_dataset(path: str | None = None, *, vocab_size: int | None = None,
                 corpus_bytes: int = DEFAULT_CORPUS_BYTES) -> Dataset:
    """Load the default corpus (`path` None), a text file, a ``.bin`` file or a directory
    with ``train.bin``/``val.bin``. `vocab_size` overrides the inferred vocabulary (bytes:
    256; ``.bin``: largest token id + 1). Raises ValueError on a missing or empty source."""
    if path is None:
        train, val = stdlib_corpus(corpus_bytes)
        source = f"python-stdlib:{sysconfig.get_paths()['stdlib']}"
        inferred = 256
    else:
        p = Path(path)
        if p.is_dir():
            train_file, val_file = p / "train.bin", p / "val.bin"
            if not (train_file.is_file() and val_file.is_file()):
                raise ValueError(f"--data directory {path} has no train.bin and val.bin")
            train = _memmap(train_file, np.uint16)
            val = _memmap(val_file, np.uint16)
            inferred = max(_max_token(train), _max_token(val)) + 1
        elif p.is_file():
            tokens = _memmap(p, np.uint16 if p.suffix == ".bin" else np.uint8)
            split = len(tokens) - max(1, int(len(tokens) * VAL_FRACTION))
            train, val = tokens[:split], tokens[split:]
            inferred = _max_token(tokens) + 1 if p.suffix == ".bin" else 256
        else:
            raise ValueError(f"--data {path}: no such file or directory")
        source = str(p.resolve())
    if vocab_size is not None:
        if vocab_size < inferred:
            raise ValueError(f"--vocab-size {vocab_size} is smaller than the data's largest "
                             f"token id + 1 ({inferred})")
        inferred = vocab_size
    return Dataset(train=train, val=val, vocab_size=inferred, source=source)


def _memmap(path: Path, dtype: type) -> np.ndarray:
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size < 2 * itemsize:
        raise ValueError(f"--data {path}: file is empty or too short ({size} bytes)")
    if size % itemsize:
        raise ValueError(f"--data {path}: {size} bytes is not a whole number of uint16 tokens")
    return np.memmap(path, dtype=dtype, mode="r")


def check_fits(dataset: Dataset, world_size: int, block_size: int) -> None:
    """ValueError unless every rank's train shard and the validation split hold one sequence."""
    need = block_size + 1
    shortest = min(len(dataset.shard(r, world_size)) for r in range(world_size))
    if shortest < need:
        raise ValueError(
            f"data {dataset.source} is too short for one batch: the train split has "
            f"{len(dataset.train)} tokens, {shortest} per rank at {world_size} ranks, and a "
            f"sequence needs {need} (block size {block_size} + 1)")
    if len(dataset.val) < need:
        raise ValueError(
            f"data {dataset.source} is too short for one batch: the validation split has "
            f"{len(dataset.val)} tokens and a sequence needs {need} (block size {block_size} + 1)")


def _windows(tokens: np.ndarray, offsets: np.ndarray,
             block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[o:o + block_size + 1], dtype=np.int64) for o in offsets])
    batch = torch.from_numpy(rows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class BatchSampler:
    """Random (inputs, targets) windows of `block_size` tokens from one token array.

    Batch number i is drawn from a generator seeded by (seed, stream, i): the sampler's whole
    state is `position`, the number of batches drawn so far.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int,
                 stream: int = 0):
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one sequence of "
                             f"{block_size} + 1")
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.seed, self.stream = seed, stream
        self.position = 0

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` (does not move `position`)."""
        rng = np.random.default_rng([self.seed, self.stream, index])
        offsets = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        return _windows(self.tokens, offsets, self.block_size)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.position)
        self.position += 1
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self()

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "stream": self.stream}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["stream"] != self.stream:
            raise ValueError("checkpoint's data sampler was made with another seed or rank")
        self.position = int(state["position"])
