"""Sequence layout, token cache and the LM's DataModule.

Datasets themselves live in ``lmgen.datasets`` (one module per dataset family). This module
turns a (dataset, tokenizer) pair into LM training sequences:

1. ``TokenCache``: every image of a split is encoded once into memory-mapped ``.npy`` shards
   under ``<cache_root>/<key>/``, where ``key`` hashes everything that determines the
   tokens (dataset fingerprint + tokenizer config + fitted tokenizer state). Reruns and
   sweeps over LM sizes reuse it. The directory appears atomically (temp dir + rename), its
   files fsynced; ``meta.json`` records their sizes and SHA-256s, checked before every use
   (``cache_damage``: sizes always, digests once per process per version of a file, ~1 s per
   GB). A truncated, garbled or missing file discards the cache with a warning and it is
   encoded again: no crash at load or at step 1, no wrong tokens.
2. ``SequenceLayout``: where the special tokens live — past the tokenizer's vocabulary —
   and how an image's ids become ``[cond, t_1 … t_n, (EOS), PAD …]``.
3. ``TokenDataModule``: Lightning loaders yielding ``SequenceBatch``es trimmed to the
   longest item of each batch. A batch is read in one go (``TokenCache.__getitems__``: one
   fancy index per shard, one int64 conversion), not item by item.

Where a tokenizer's ``encode`` is per-image CPU work (``encode_in_workers``: codecs, pixels),
the cache writer encodes inside the DataLoader's workers, in parallel; learned tokenizers
encode in the main process in big batches. Either way the cache holds the same bytes.

Nothing here branches on a tokenizer's name: only ``vocab_size``, ``max_tokens`` and
``variable_length`` matter.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from lmgen.datasets import ImageBatch, collate_images, iter_batches
from lmgen.datasets.base import Item
from lmgen.files import atomic_write, manifest, mismatch
from lmgen.paths import writing
from lmgen.progress import CountProgress, phase
from lmgen.tokenizers.base import ImageTokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the on-disk layout changes


@dataclass(frozen=True)
class SequenceLayout:
    """Token ids of one LM sequence.

    ``[0, vocab_size)`` are the tokenizer's ids; then BOS, EOS, PAD, one id per class and a
    null class (the "no label" token used by classifier-free guidance and label dropout).
    Position 0 holds the class token (class-conditional) or BOS (unconditional); codec
    streams (``variable_length``) end with EOS and are right-padded with PAD; fixed grids
    have neither.
    """

    vocab_size: int
    max_tokens: int
    num_classes: int
    variable_length: bool
    class_conditional: bool = True

    @property
    def bos(self) -> int:
        return self.vocab_size

    @property
    def eos(self) -> int:
        return self.vocab_size + 1

    @property
    def pad(self) -> int:
        return self.vocab_size + 2

    @property
    def class_offset(self) -> int:
        return self.vocab_size + 3

    @property
    def null_class(self) -> int:
        return self.class_offset + self.num_classes

    @property
    def total_vocab(self) -> int:
        """Embedding/head size of the LM: image ids + specials."""
        return self.null_class + 1

    @property
    def seq_len(self) -> int:
        """Longest sequence, cond token included."""
        return 1 + self.max_tokens + int(self.variable_length)

    def cond_tokens(self, labels: Tensor | None, batch_size: int) -> Tensor:
        """(B, 1) int64: class tokens, or BOS for an unconditional model or ``labels=None``."""
        if not self.class_conditional or labels is None:
            return torch.full((batch_size, 1), self.bos, dtype=torch.int64)
        return (labels.to(torch.int64) + self.class_offset).view(-1, 1)

    def null_tokens(self, batch_size: int) -> Tensor:
        """(B, 1) int64: the unconditional prompt used for CFG rows."""
        fill = self.null_class if self.class_conditional else self.bos
        return torch.full((batch_size, 1), fill, dtype=torch.int64)

    def sequences(self, ids: Tensor, lengths: Tensor, labels: Tensor | None) -> Tensor:
        """(B, L) image ids + (B,) lengths → (B, 1 + L + eos) full sequences (PAD past the end)."""
        batch, width = ids.shape
        seq = torch.empty((batch, 1 + width + int(self.variable_length)), dtype=torch.int64)
        seq[:, :1] = self.cond_tokens(labels, batch)
        body = seq[:, 1 : 1 + width]
        body.copy_(ids)  # in place: this runs once per LM batch, on the data-loading path
        body.masked_fill_(torch.arange(width).view(1, -1) >= lengths.view(-1, 1), self.pad)
        if self.variable_length:
            seq[:, -1] = self.pad
            seq[torch.arange(batch), 1 + lengths] = self.eos
        return seq

    def allowed(self) -> Tensor:
        """(total_vocab,) bool: ids the sampler may emit (image ids, and EOS for streams)."""
        mask = torch.zeros(self.total_vocab, dtype=torch.bool)
        mask[: self.vocab_size] = True
        mask[self.eos] = self.variable_length
        return mask


@dataclass(frozen=True)
class SequenceBatch:
    """One LM batch.

    inputs/targets: (B, T) int64, ``targets[:, t]`` is the id after ``inputs[:, t]``; targets
    equal PAD where there is nothing to predict. labels: (B,) int64 class indices.
    """

    inputs: Tensor
    targets: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def pin_memory(self) -> SequenceBatch:
        """A copy in page-locked memory (DataLoader ``pin_memory``: asynchronous copies to CUDA)."""
        return SequenceBatch(self.inputs.pin_memory(), self.targets.pin_memory(), self.labels.pin_memory())


@dataclass(frozen=True)
class TokenRows:
    """Rows of a token cache read as one batch (``TokenCache.__getitems__``).

    ids: (B, W) int64, W = the longest of ``lengths`` (0 past each item's length);
    lengths: (B,) int64 valid ids per item; labels: (B,) int64 class indices.
    """

    ids: Tensor
    lengths: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


class TokenCache(Dataset):
    """Memory-mapped token ids of one split: item i → (ids (max_tokens,) int64, length, label).

    The LM's DataLoader reads whole batches through ``__getitems__`` (a ``TokenRows``), which
    PyTorch's fetcher prefers to one ``__getitem__`` per index.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self._ids = self._open_shards()
        self.lengths = torch.from_numpy(np.load(self.path / "lengths.npy"))
        self.labels = torch.from_numpy(np.load(self.path / "labels.npy"))
        self.indices = torch.from_numpy(np.load(self.path / "indices.npy"))
        self._starts = np.cumsum([0] + [len(a) for a in self._ids])

    def _open_shards(self) -> list[np.ndarray]:
        return [np.load(self.path / name, mmap_mode="r") for name in self.meta["shards"]]

    def __getstate__(self) -> dict:
        # A spawned DataLoader worker gets the cache pickled: reopen the memmaps there rather
        # than pickle every shard's contents (which is what pickling a memmap does).
        return {**self.__dict__, "_ids": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ids = self._open_shards()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        row = self._ids[shard][i - self._starts[shard]]
        return torch.from_numpy(row.astype(np.int64)), int(self.lengths[i]), int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]) -> TokenRows:
        """The rows at ``indices`` (in that order) as one ``TokenRows``, trimmed to their longest
        stream: one fancy index per shard straight into an int64 array, no per-item work."""
        index = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[torch.from_numpy(index)]
        width = int(lengths.max()) if len(index) else 0
        shard_of = np.searchsorted(self._starts, index, side="right") - 1
        ids = np.empty((len(index), width), dtype=np.int64)
        if len(self._ids) == 1:
            ids[:] = self._ids[0][index, :width]                     # converts uint16/int32 → int64 once
        else:
            for shard in np.unique(shard_of):
                rows = shard_of == shard
                ids[rows] = self._ids[shard][index[rows] - self._starts[shard], :width]
        return TokenRows(ids=torch.from_numpy(ids), lengths=lengths, labels=self.labels[torch.from_numpy(index)])

    def batches(self, batch_size: int = 4096) -> Iterator[tuple[Tensor, Tensor]]:
        """(ids (B, max_tokens) int64, lengths (B,)) over the whole split, read shard by shard."""
        for shard, start in zip(self._ids, self._starts):
            for lo in range(0, len(shard), batch_size):
                rows = np.asarray(shard[lo : lo + batch_size], dtype=np.int64)
                yield torch.from_numpy(rows), self.lengths[start + lo : start + lo + len(rows)]

    @property
    def skipped(self) -> int:
        """Unreadable images left out when the cache was written."""
        return int(self.meta["skipped"])

    @classmethod
    def build_or_load(cls, root: Path, key: str, dataset, tokenizer: ImageTokenizer,
                      batch_size: int = 256, num_workers: int = 0, shard_size: int = 65536) -> TokenCache:
        """Load the cache at ``root/key`` or encode ``dataset`` into it first (atomically); one that
        fails its checks (``cache_damage``) is discarded with a warning and encoded again. Callers
        that may race on one key serialise (stage 1 holds its tokenizer key's lock)."""
        final = Path(root) / key
        if final.exists():
            damage = cache_damage(final)
            if damage is None:
                log.info("token cache hit: %s", final)
                return cls(final)
            log.warning("token cache %s is damaged (%s): discarded, encoding it again", final, damage)
            _discard(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            with writing(final), phase(f"token cache {key}: encoding {len(dataset)} items"):  # full disk: DiskFull
                _write_cache(tmp, dataset, tokenizer, batch_size, num_workers, shard_size, key)
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished the same cache first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("token cache written: %s", final)
        return cls(final)


def _cache_files(meta: dict) -> list[str]:
    """Every file a cache with ``meta`` reads besides meta.json itself."""
    return [*meta["shards"], "lengths.npy", "labels.npy", "indices.npy"]


def cache_damage(path: Path) -> str | None:
    """Why the token cache at ``path`` cannot be used (None if it can): meta.json missing or not
    the manifest lmgen writes (a cache from before checksums), or a file that no longer matches
    it (``lmgen.files.mismatch``: missing, resized, or garbled)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        recorded = {name: meta["files"][name] for name in _cache_files(meta)} if "files" in meta else None
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:  # not JSON, or not the manifest lmgen writes
        return f"meta.json is unreadable ({type(err).__name__}: {err})"
    return mismatch(path, recorded) if recorded is not None else "written before lmgen recorded checksums"


def _discard(path: Path) -> None:
    """Move a damaged cache out of the way in one rename, then delete it (readers that still
    map its shards keep their inodes until they close them)."""
    doomed = path.with_name(f".{path.name}-damaged-{secrets.token_hex(4)}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:  # already discarded
        return
    shutil.rmtree(doomed, ignore_errors=True)


@dataclass(frozen=True)
class CacheRows:
    """One batch of images encoded into token-cache rows.

    ids: (K, max_tokens) uint16 or int32 (the cache's dtype), 0 past each length; lengths,
    labels, indices: (K,) int64 — the K items whose stream fits ``max_tokens``. too_long:
    readable items left out for a longer stream; skipped: unreadable items dropped. ``len``
    counts every readable item (K + too_long), as ``iter_batches`` expects.
    """

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    too_long: int
    skipped: int

    def __len__(self) -> int:
        return len(self.ids) + self.too_long


class RowEncoder:
    """Images → ``CacheRows`` with one tokenizer.

    Also a DataLoader ``collate_fn`` (``(index, item)`` pairs → ``CacheRows``): given to
    ``iter_batches`` for an ``encode_in_workers`` tokenizer, the workers encode in parallel and
    send back rows already in the cache's dtype. Pickles with its tokenizer (spawned workers).
    """

    def __init__(self, tokenizer: ImageTokenizer) -> None:
        self.tokenizer = tokenizer
        self.dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32

    def rows(self, batch: ImageBatch) -> CacheRows:
        """Encode a batch of B ≥ 1 images (or clips) with the tokenizer."""
        tokens = self.tokenizer.encode(batch.images)
        lengths = tokens.lengths.cpu().numpy()
        keep = lengths <= self.tokenizer.max_tokens
        width = min(tokens.ids.shape[1], self.tokenizer.max_tokens)
        ids = np.zeros((int(keep.sum()), self.tokenizer.max_tokens), dtype=self.dtype)
        ids[:, :width] = tokens.ids[:, :width].cpu().numpy()[keep]  # ids < vocab_size: the cast is exact
        return CacheRows(ids=ids, lengths=lengths[keep].astype(np.int64), labels=batch.labels.numpy()[keep],
                         indices=batch.indices.numpy()[keep], too_long=int((~keep).sum()), skipped=batch.skipped)

    def __call__(self, items: Sequence[tuple[int, Item]]) -> CacheRows:
        if get_worker_info() is not None:
            # DataLoader already holds each worker to one torch thread; Hugging Face's BPE
            # encoder (Rayon) would still start one thread per core in every worker.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        batch = collate_images(items)
        if not len(batch):  # every item unreadable: nothing to encode (and no image shape to check)
            empty = np.zeros(0, dtype=np.int64)
            return CacheRows(np.zeros((0, self.tokenizer.max_tokens), self.dtype), empty, empty, empty, 0, batch.skipped)
        return self.rows(batch)


def _write_cache(path: Path, dataset, tokenizer: ImageTokenizer, batch_size: int,  # noqa: PLR0913
                 num_workers: int, shard_size: int, label: str) -> None:
    """Encode every readable image of ``dataset`` into shards under ``path`` — in the
    DataLoader's workers where the tokenizer says so (``encode_in_workers``), else here."""
    encoder = RowEncoder(tokenizer)
    in_loader = bool(getattr(tokenizer, "encode_in_workers", False))
    batches = iter_batches(dataset, batch_size, num_workers, collate_fn=encoder if in_loader else collate_images)
    shards: list[str] = []
    lengths, labels, indices = [], [], []
    buffer: list[np.ndarray] = []
    too_long = 0
    progress = CountProgress(f"token cache {label}", len(dataset), "items")
    for batch in batches:
        rows = batch if in_loader else encoder.rows(batch)
        progress.update(len(rows.lengths))
        too_long += rows.too_long
        buffer.append(rows.ids)
        lengths.append(rows.lengths)
        labels.append(rows.labels)
        indices.append(rows.indices)
        if sum(len(b) for b in buffer) >= shard_size:
            shards.append(_write_shard(path, len(shards), buffer))
            buffer = []
    if buffer:
        shards.append(_write_shard(path, len(shards), buffer))
    count = int(sum(len(x) for x in lengths))
    if count == 0:
        raise ValueError(f"dataset has no usable items ({batches.skipped} unreadable of {len(dataset)})")
    if too_long:
        log.warning("%d streams longer than max_tokens=%d were left out", too_long, tokenizer.max_tokens)
    _save(path / "lengths.npy", np.concatenate(lengths).astype(np.int64))
    _save(path / "labels.npy", np.concatenate(labels).astype(np.int64))
    _save(path / "indices.npy", np.concatenate(indices).astype(np.int64))
    meta = {"format": CACHE_FORMAT, "shards": shards, "count": count, "skipped": batches.skipped,
            "too_long": too_long, "vocab_size": tokenizer.vocab_size, "max_tokens": tokenizer.max_tokens}
    # The manifest cache_damage checks; hashing now (from the page cache) also spares this
    # process a second hash when it loads the cache it just wrote.
    meta["files"] = manifest(path, _cache_files(meta))
    with atomic_write(path / "meta.json") as out:
        out.write(json.dumps(meta, indent=1).encode())


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as out:  # fsynced: a crash after the directory's rename cannot leave it empty
        np.save(out, array)


def _write_shard(path: Path, number: int, rows: list[np.ndarray]) -> str:
    name = f"ids-{number:05d}.npy"
    _save(path / name, np.concatenate(rows))
    return name


class SequenceCollator:
    """A ``TokenRows`` batch (``TokenCache.__getitems__``), or a list of (ids, length, label)
    items (any other dataset) → ``SequenceBatch`` trimmed to the batch's longest stream."""

    def __init__(self, layout: SequenceLayout) -> None:
        self.layout = layout

    def __call__(self, items: TokenRows | list[tuple[Tensor, int, int]]) -> SequenceBatch:
        if isinstance(items, TokenRows):
            ids, lengths, labels = items.ids, items.lengths, items.labels
        else:
            lengths = torch.tensor([length for _, length, _ in items], dtype=torch.int64)
            width = int(lengths.max())
            ids = torch.stack([ids[:width] for ids, _, _ in items])
            labels = torch.tensor([label for _, _, label in items], dtype=torch.int64)
        seq = self.layout.sequences(ids, lengths, labels)
        return SequenceBatch(inputs=seq[:, :-1], targets=seq[:, 1:], labels=labels)


class EpochSampler(Sampler[int]):
    """The item order of one rank in one epoch, a pure function of (seed, epoch, rank, world).

    ``shuffle``: a permutation drawn from a generator seeded by (seed, epoch) alone — not a
    generator carried from epoch to epoch — so any epoch can be rebuilt after a restart; else
    index order. With ``world`` ranks, rank r takes items r, r + world, … of the epoch's order,
    cut (``drop_last``) or wrapped around to a multiple of ``world``. ``resume_after(k, e)`` makes
    the next pass, if it is epoch e, start after the first k items of this rank (a run restarting
    mid-epoch; a checkpoint written at an epoch's last batch restarts in epoch e + 1, whole);
    later passes are whole. ``set_epoch`` is called by Lightning before each epoch.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1,  # noqa: PLR0913
                 drop_last: bool = False) -> None:
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, rank, world
        self.drop_last, self.epoch, self._skip = drop_last, 0, (0, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_after(self, items: int, epoch: int) -> None:
        self._skip = (items, epoch)

    def order(self) -> Tensor:
        """(len(self),) int64: this rank's item indices for the current epoch, whole."""
        if self.shuffle:
            seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.size)
        if self.drop_last:
            order = order[: self.size - self.size % self.world]
        elif self.size % self.world:
            order = torch.cat([order, order[: self.world - self.size % self.world]])
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        (skip, epoch), self._skip = self._skip, (0, 0)
        return iter(self.order()[skip if epoch == self.epoch else 0 :].tolist())

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.world
        return -(-self.size // self.world)


class TokenDataModule(L.LightningDataModule):
    """Train/val loaders over two token caches.

    The train order is ``EpochSampler``'s (seeded per epoch, sharded over DDP ranks here, so
    the trainer runs with ``use_distributed_sampler=False``). A run restored from a checkpoint
    mid-epoch continues the epoch where it stopped: the loader is built after Lightning has
    restored its loop counters, and skips the batches the checkpointed run had consumed.

    ``pin_memory``: put batches in page-locked memory so the copy to the GPU is asynchronous;
    None (default) pins when the attached trainer runs on CUDA.
    """

    def __init__(self, train: TokenCache, val: TokenCache, layout: SequenceLayout,  # noqa: PLR0913
                 batch_size: int, num_workers: int = 0, seed: int = 0, pin_memory: bool | None = None) -> None:
        super().__init__()
        self.train, self.val, self.layout = train, val, layout
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pin_memory = pin_memory

    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, cache: TokenCache, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        drop_last = shuffle and len(cache) >= self.batch_size * world
        sampler = EpochSampler(len(cache), self.seed, shuffle, rank, world, drop_last)
        if shuffle and trainer is not None:
            # Batches of the current epoch that the restored run already trained on (0 unless
            # restarting mid-epoch: Lightning restores its loop state before asking for loaders).
            # `ready`, not `completed`: a checkpoint written in on_train_batch_end (ModelCheckpoint)
            # holds completed = ready - 1 although that batch's optimizer step is done.
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            sampler.resume_after(done * self.batch_size, trainer.current_epoch)
        return DataLoader(cache, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, collate_fn=SequenceCollator(self.layout),
                          persistent_workers=self.num_workers > 0, pin_memory=self._pin())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)

    def transfer_batch_to_device(self, batch: SequenceBatch, device: torch.device,
                                 dataloader_idx: int) -> SequenceBatch:
        # non_blocking: asynchronous from pinned memory, an ordinary copy otherwise
        return SequenceBatch(batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True),
                             batch.labels.to(device, non_blocking=True))
