"""The packed training loader: fixed-shape (B, L) CPU batches of whole documents (or, with
length_buckets, a few shapes of B * L slots each: data/buckets.py).

Rows are packed by data/packing.py (whole documents `<cls> residues <eos>`, first fit from a
window of WINDOW documents, right-padded with <pad>). A document longer than L becomes
`<cls> window of L-2 residues <eos>`: a random window (crop="random", ESM2) or every
consecutive window (crop="split", each chunk its own document), so rows never hold a
document without its <cls> and <eos>.

Training epochs: the file order is drawn from (seed, epoch); inside a file the documents are
permuted by (seed, epoch, file) and rank r takes every world_size-th one from position r, so
ranks never share a document within an epoch and together cover every document.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data.buckets import BucketPacker, bucket_lengths, check_buckets
from data.masking import MaskingConfig, diffusion_rate, mask_batch
from data.packing import MIN_DOC, WINDOW, empty_rows, open_shard, shard_tokens, take_row, write_row
from data.tokenizer import FIRST_RESIDUE_ID

# Masking runs on chunks of rows below torch's parallel grain (32,768 elements), so the
# background thread never opens an OpenMP region: on cores busy with the training step such
# regions were measured 10-40x slower than the same work done inline (speed/loader.py).
MASK_CHUNK_ELEMENTS = 16384
STATE_VERSION = 1


class _OpenFile(NamedTuple):
    epoch: int
    fid: int
    starts: np.ndarray
    ends: np.ndarray
    mine: np.ndarray  # this rank's documents of the file, in reading order
    offsets: np.ndarray  # random-crop offsets of every document


class _Sources(dict):
    """File id -> tokens, opening a shard on first use (a restored state may name any file)."""

    def __init__(self, files):
        super().__init__()
        self.files = files

    def __missing__(self, fid: int) -> np.ndarray:
        self[fid] = tokens = shard_tokens(self.files[fid])
        return tokens

    def keep_only(self, live: set):
        for fid in [k for k in self if k not in live]:
            del self[fid]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


class _Packer:
    """The deterministic producer behind TrainLoader; its whole position is `state()`."""

    def __init__(self, files, batch_size, seq_len, rank, world_size, seed, crop, doc_multiple=1):
        self.files, self.B, self.L = list(files), batch_size, seq_len
        self.doc_multiple = doc_multiple  # each document at a multiple of this (packing.span)
        self.rank, self.world, self.seed, self.crop = rank, world_size, seed, crop
        self.epoch = self.file_pos = self.cursor = 0
        self.batches = self.pad_tokens = self.total_tokens = 0
        self.pending: list[tuple] = []
        self._sources = _Sources(self.files)
        self._file: _OpenFile | None = None
        self._order = None  # (epoch, file order of that epoch)

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "file_pos": self.file_pos,
            "cursor": self.cursor,
            "pending": [list(p) for p in self.pending],
            "batches": self.batches,
            "pad_tokens": self.pad_tokens,
            "total_tokens": self.total_tokens,
        }

    def load(self, s: dict):
        for k in ("epoch", "file_pos", "cursor", "batches", "pad_tokens", "total_tokens"):
            setattr(self, k, int(s[k]))
        self.pending = [tuple(p) for p in s["pending"]]
        self._file = None

    def kinds(self) -> list[tuple[int, int, bool]]:
        """(rows, length, whole rows?) of every kind of micro-batch: one, full rows."""
        return [(self.B, self.L, False)]

    def rank_documents(self, epoch: int, fid: int, n_docs: int) -> np.ndarray:
        """This rank's documents of file `fid` in `epoch`, in reading order: a permutation drawn
        from (seed, epoch, file), the same on every rank, of which rank r takes r, r+W, ..."""
        perm = np.random.default_rng([self.seed, epoch, fid, 0]).permutation(n_docs)
        return perm[self.rank :: self.world]

    def _current_file(self):
        if self._order is None or self._order[0] != self.epoch:
            self._order = (
                self.epoch,
                np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files)),
            )
        fid = int(self._order[1][self.file_pos])
        if self._file is None or (self._file.epoch, self._file.fid) != (self.epoch, fid):
            tokens, starts, ends = open_shard(self.files[fid])
            n = len(starts)
            room = np.maximum(ends - starts - self.L, 0)  # crop offsets, drawn for every document
            offsets = (
                np.random.default_rng([self.seed, self.epoch, fid, 1]).random(n) * (room + 1)
            ).astype(np.int64)
            self._file = _OpenFile(
                self.epoch, fid, starts, ends, self.rank_documents(self.epoch, fid, n), offsets
            )
            self._sources[fid] = tokens
        return self._file

    def _pieces(self, f: _OpenFile, d: int) -> list[tuple]:
        fid = f.fid
        s, n, cap = int(f.starts[d]) + 1, int(f.ends[d] - f.starts[d]) - 2, self.L - 2
        if n <= cap:
            return [(fid, s, n)]
        if self.crop == "random":
            return [(fid, s + int(f.offsets[d]), cap)]
        return [(fid, s + j, min(cap, n - j)) for j in range(0, n, cap)]

    def _read(self) -> list[tuple] | None:
        """The pieces of the next document of the current epoch ([] at the end of a file),
        or None once the epoch is read (file_pos == n_files)."""
        if self.file_pos >= len(self.files):
            return None
        f = self._current_file()
        if self.cursor >= len(f.mine):
            self.file_pos, self.cursor = self.file_pos + 1, 0
            return []
        self.cursor += 1
        return self._pieces(f, int(f.mine[self.cursor - 1]))

    def _next_epoch(self):
        self.epoch, self.file_pos, self.cursor = self.epoch + 1, 0, 0

    def _refill(self):
        """Top the window up from the current epoch only."""
        while len(self.pending) < WINDOW and (pieces := self._read()) is not None:
            self.pending += pieces

    def next_tokens(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """One batch: tokens, doc ids, and False (rows are not kept to one document each: only
        BucketPacker's whole_rows does that). A batch never mixes epochs: the last one of an
        epoch ends in padding rows, so every batch belongs to `epoch` of the state that follows it."""
        tokens, docs = empty_rows(self.B, self.L)
        for r in range(self.B):
            self._refill()
            if not self.pending and r == 0:  # the epoch is read and its rows are out: next epoch
                self._next_epoch()
                self._refill()
                if not self.pending:
                    raise ValueError(
                        f"rank {self.rank} of {self.world} gets no document from "
                        f"{len(self.files)} training shard(s); use fewer ranks or more data"
                    )
            if not self.pending:
                continue
            row, _ = take_row(self.pending, self.L, self.doc_multiple)
            write_row(tokens, docs, r, row, self._sources, self.doc_multiple)
        return (*self._count(tokens, docs, self.pending), False)

    def _count(self, tokens, docs, pending) -> tuple[np.ndarray, np.ndarray]:
        """Books a finished batch and lets go of shards no pending piece needs."""
        self.pad_tokens += int((docs < 0).sum())  # the rows' ends and any gaps of doc_multiple
        self.total_tokens += docs.size
        self.batches += 1
        current = {self._file.fid} if self._file else set()
        self._sources.keep_only({p[0] for p in pending} | current)
        return tokens, docs


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _bucket_set(length_buckets: int | list[int], seq_len: int, multiple: int) -> list[int]:
    """The row lengths of a bucketed loader ([] for full rows only): length_buckets n > 1, or
    the lengths themselves (speed/buckets.py compares other bucket sets)."""
    if isinstance(length_buckets, int):
        check_buckets(seq_len, length_buckets, multiple)
        return bucket_lengths(seq_len, length_buckets) if length_buckets > 1 else []
    lengths = list(length_buckets)
    if lengths != sorted(set(lengths)) or lengths[-1] != seq_len or lengths[0] < MIN_DOC:
        raise ValueError(f"length_buckets={lengths} must rise strictly to seq_len={seq_len}")
    return lengths


class TrainLoader:
    """Endless training batches dict(input_ids, labels, doc_ids): CPU LongTensors (B, L), plus
    loss_weights (float32) and loss_counted (bool) under masked diffusion (data/masking.py),
    and `whole_rows: True` (a Python bool) on a micro-batch whose every row is one document or
    padding only, so attention needs no mask (with whole_rows only, bucketed or not: the
    bucket packer then deals the global stream; every rank gets it at the same micro-step).

    Masking runs here on the CPU, from a generator seeded by (seed, rank, batch index), in a
    background thread that keeps up to `prefetch` batches ready (0 = no thread). state_dict()
    describes the batches the caller has consumed, not those prefetched, so a loader restored
    from it yields exactly what this one would have yielded next.
    """

    def __init__(
        self,
        files,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        masking: MaskingConfig | None = None,
        micro_steps_per_step: int = 1,
        crop: str = "random",
        prefetch: int = 4,
        doc_multiple: int = 1,
        length_buckets: int | list[int] = 1,
        whole_rows: bool = False,
    ):
        self._thread = None  # set first: __del__ runs even when a check below fails
        files = [Path(f) for f in files]
        if not files:
            raise ValueError(
                "TrainLoader got no training shards; prepare or download a dataset first"
            )
        if batch_size < 1 or seq_len < MIN_DOC:
            raise ValueError(
                f"batch_size={batch_size} and seq_len={seq_len} must be >= 1 and >= {MIN_DOC}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in 0..world_size-1 (world_size={world_size})")
        if crop not in ("random", "split"):
            raise ValueError(f"crop={crop!r} is unknown; use 'random' or 'split'")
        if seed < 0 or micro_steps_per_step < 1 or prefetch < 0:
            raise ValueError("seed and prefetch must be >= 0 and micro_steps_per_step >= 1")
        self.masking = masking or MaskingConfig()
        self.micro_steps_per_step, self.prefetch = micro_steps_per_step, prefetch
        if doc_multiple < 1 or seq_len % doc_multiple:
            raise ValueError(f"doc_multiple={doc_multiple} must be >= 1 and divide seq_len={seq_len}, "
                             "or a cropped document would never fit a row")
        lengths = _bucket_set(length_buckets, seq_len, doc_multiple) or ([seq_len] if whole_rows else [])
        if lengths:
            # rank 0 of 1 reads the global stream that BucketPacker deals from
            reader = _Packer(files, batch_size, seq_len, 0, 1, seed, crop, doc_multiple)
            self._packer = BucketPacker(reader, batch_size, seq_len, rank, world_size, lengths, doc_multiple,
                                        whole_rows)
        else:
            self._packer = _Packer(files, batch_size, seq_len, rank, world_size, seed, crop, doc_multiple)
        self._config = {
            "version": STATE_VERSION,
            "files": [f.name for f in files],
            "seed": seed,
            "rank": rank,
            "world_size": world_size,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "crop": crop,
            # only when set, so the states of loaders from before buckets still load
            **({"length_buckets": length_buckets} if lengths else {}),
            **({"whole_rows": True} if whole_rows else {}),
        }
        self._consumed = self._packer.state()

    # -- production (in the prefetch thread when prefetch > 0) --
    def _produce_one(self) -> tuple[dict, dict]:
        p = self._packer
        index = p.batches
        tokens, docs, whole = p.next_tokens()
        doc_ids = torch.from_numpy(docs)
        batch = {**self.mask(torch.from_numpy(tokens), index, doc_ids), "doc_ids": doc_ids}
        return {**batch, "whole_rows": True} if whole else batch, p.state()

    def mask(self, tokens: torch.Tensor, index: int, doc_ids: torch.Tensor | None = None) -> dict:
        """The masked fields of batch `index` from its (B, L) token ids (data.masking.mask_batch:
        input_ids and labels, and under masked diffusion loss_weights and loss_counted), for
        optimizer step index // micro_steps_per_step: the step alone decides the rate and the
        phase, so prefetched batches and a resumed loader switch at the same step. Masked over
        consecutive row chunks with one generator seeded by (seed, rank, index). doc_ids is
        needed by per-sequence diffusion only."""
        p = self._packer
        g = torch.Generator().manual_seed(_seed(p.seed, p.rank, index))
        step = index // self.micro_steps_per_step
        diffusing = self.masking.diffusion_at(step)
        if doc_ids is None and diffusing and self.masking.diffusion == "sequence":
            raise ValueError("TrainLoader.mask needs doc_ids under per-sequence masked diffusion")
        # per-batch diffusion: one rate for the whole micro-batch, not one per chunk
        batch_rate = diffusion_rate(g) if diffusing and self.masking.diffusion == "batch" else None
        rows = max(1, MASK_CHUNK_ELEMENTS // tokens.shape[1])
        out = {}
        for i in range(0, tokens.shape[0], rows):
            chunk = tokens[i : i + rows].long()  # chunk by chunk, like every op here
            docs = None if doc_ids is None else doc_ids[i : i + rows]
            for k, v in mask_batch(chunk, docs, step, self.masking, g, batch_rate).items():
                if k not in out:
                    out[k] = torch.empty(tokens.shape, dtype=v.dtype)
                out[k][i : i + rows] = v
        return out

    def _run(self, stop: threading.Event, q: queue.Queue):
        try:
            while not stop.is_set():
                item = self._produce_one()
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(_Failure(e))

    def _stop_thread(self):
        if self._thread is not None:
            stop, thread, _ = self._thread
            stop.set()
            thread.join()
            self._thread = None

    # -- consumer side --
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.prefetch == 0:
            batch, state = self._produce_one()
        else:
            if self._thread is None:
                stop, q = threading.Event(), queue.Queue(maxsize=self.prefetch)
                thread = threading.Thread(
                    target=self._run, args=(stop, q), daemon=True, name="TrainLoader-prefetch"
                )
                self._thread = (stop, thread, q)
                thread.start()
            item = self._thread[2].get()
            if isinstance(item, _Failure):
                self._stop_thread()
                raise item.error
            batch, state = item
        self._consumed = state
        return batch

    def state_dict(self) -> dict:
        return {
            **self._config,
            **self._consumed,
            "pending": [list(p) for p in self._consumed["pending"]],
        }

    def load_state_dict(self, sd: dict):
        defaults = {"length_buckets": 1, "whole_rows": False}  # keys written only when they differ
        for k, v in {**defaults, **self._config}.items():
            if (got := sd.get(k, defaults.get(k))) != v:
                raise ValueError(
                    f"loader state has {k}={got!r} but this loader has {v!r}; "
                    "resume with the same data, seed, shape and world size"
                )
        self._stop_thread()  # prefetched batches belong to the old position
        self._packer.load(sd)
        self._consumed = self._packer.state()

    @property
    def padding_fraction(self) -> float:
        total = self._consumed["total_tokens"]
        return self._consumed["pad_tokens"] / total if total else 0.0

    @property
    def epoch(self) -> int:
        return self._consumed["epoch"]

    @property
    def batches_yielded(self) -> int:
        return self._consumed["batches"]

    def kinds(self) -> list[tuple[int, int, bool]]:
        """(rows, length, whole rows?) of every kind of micro-batch this loader can yield, each a
        graph of its own where shapes compile (training/precompile.py)."""
        return self._packer.kinds()

    def example(self, kind: tuple[int, int, bool], step: int) -> dict:
        """A batch of `kind` as optimizer step `step` would get it (the same fields, dtypes and
        masking phase), every row one document that fills it; it leaves the loader as it was."""
        rows, length, whole = kind
        tokens, docs = empty_rows(rows, length)
        n = length - 2  # <cls> residues <eos>
        residues = {0: (np.arange(n) % 20 + FIRST_RESIDUE_ID).astype(tokens.dtype)}
        for r in range(rows):
            write_row(tokens, docs, r, [(0, 0, n)], residues)
        doc_ids = torch.from_numpy(docs)
        batch = {**self.mask(torch.from_numpy(tokens), step * self.micro_steps_per_step, doc_ids), "doc_ids": doc_ids}
        return {**batch, "whole_rows": True} if whole else batch

    def close(self):
        self._stop_thread()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self._stop_thread()
