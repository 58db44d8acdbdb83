"""Length-bucketed micro-batches: attention that costs what the documents cost, in a few shapes.

Dense attention over a packed row of L tokens costs L^2 whatever the documents in it, where
the documents need only sum(l^2). With `length_buckets: n`, each micro-batch is instead rows
of one bucket length L_k = L * k / n (k = 1..n), as many rows as fill the B * L token slots
of the unbucketed run (floor(B * L / L_k): at most L_k slots fewer), so attention costs about
B * L * L_k: short documents go in short rows. A document belongs to the shortest bucket its
span fits; a row of bucket k starts first fit with documents of bucket k and its room is then
filled first fit with shorter ones, so rows of long documents carry little padding. Evenly
spaced lengths, not powers of two: a power-of-two bucket holds documents from half its length
up, so its rows are up to half padding or half filled with short documents paying long rows'
attention (BENCHMARKS.md, "Length-bucketed micro-batches", measured both).

Every rank must run the same shape at the same micro-step (XLA compiles one graph per shape,
and the gradient all-reduce pairs the ranks' steps). So the bucket is decided from data every
rank knows: all ranks read the one global document stream (every document's length comes
from the shard's document bounds), keep the same pools of pending pieces per bucket, and when
some pool holds LOOKAHEAD micro-batches of every rank (W x the slots) pack the fullest pool's
W row groups; rank r keeps rows r, r + W, r + 2W, ... and reads only their tokens. The mix of
buckets per step follows the data, ranks share no document within an epoch and together cover
every document, and a step still has grad_accum micro-batches per rank. The pools hold less
than n x LOOKAHEAD micro-batches of every rank, so the state stays small.

With `whole_rows`, a piece that fills a row of L exactly (a document cropped to L, or one of
exactly L positions) goes to a pool of its own, packed one piece per row: such a micro-batch
has no row that holds two documents or padding beside a document, so attention needs no mask at
all (SDPA's fast kernels, the Neuron flash kernel), and the loader says so (`whole_rows` in the
batch). The pool is chosen like the others, from the global stream, so every rank runs the
mask-free graph at the same micro-step. Its last micro-batch of an epoch may end in rows of
padding only, which need no mask either (padding attends to padding in the masked graph too).
"""

from __future__ import annotations

from data.packing import MIN_DOC, WINDOW, empty_rows, span, take_row, write_row

# Micro-batches a pool holds before it is packed. 1 packs worse: on the sample at L = 1024 and
# n = 2, 7.1% padding against 3.6% (first fit has fewer documents to choose from); 4 gives 2.9%
# for twice the pooled pieces.
LOOKAHEAD = 2


def bucket_lengths(seq_len: int, n_buckets: int) -> list[int]:
    """Row lengths, shortest first: seq_len * k / n_buckets for k = 1..n_buckets."""
    return [seq_len * k // n_buckets for k in range(1, n_buckets + 1)]


def bucket_shapes(rows: int, seq_len: int, lengths: list[int]) -> list[tuple[int, int]]:
    """(rows, length) of each bucket's micro-batch in place of `rows` x `seq_len`: as many rows
    as fill its token slots, floor(rows x seq_len / length), at most one row's slots fewer."""
    return [(rows * seq_len // length, length) for length in lengths]


def micro_batch_shapes(rows: int, seq_len: int, n_buckets: int) -> str:
    """The shapes of a run's micro-batches for its log: "8x1024", or one per bucket."""
    return ",".join(f"{r}x{length}" for r, length in bucket_shapes(rows, seq_len, bucket_lengths(seq_len, n_buckets)))


def check_buckets(seq_len: int, n_buckets: int, multiple: int = 1) -> None:
    """Refuses a bucket count the row length cannot be cut into evenly."""
    if n_buckets < 1:
        raise ValueError(f"length_buckets={n_buckets} must be >= 1 (1 = every row max_length long)")
    step = seq_len // n_buckets
    if n_buckets > 1 and (seq_len % n_buckets or step < 8 or step % multiple):
        fits = max((d for d in range(2, 9) if seq_len % d == 0 and seq_len // d >= 8), default=1)
        also = f" and a multiple of {multiple}" if multiple > 1 else ""
        raise ValueError(
            f"length_buckets={n_buckets} cuts max_length={seq_len} into rows of multiples of {seq_len / n_buckets:g} "
            f"tokens, which must be a whole number of at least 8{also}; use a count that divides max_length, "
            f"such as {fits}.")


def bucket_of(piece_span: int, lengths: list[int]) -> int:
    """The smallest bucket whose rows hold a piece of this span."""
    for k, length in enumerate(lengths):
        if piece_span <= length:
            return k
    raise ValueError(f"a piece of {piece_span} positions is longer than the rows ({lengths[-1]})")


class BucketPacker:
    """The producer behind TrainLoader with length_buckets > 1 (see the module docstring).

    `reader` is a data.loader._Packer of rank 0 of 1: it reads the global document stream
    (the same permutation every rank's unbucketed packer deals from) and books the batches.
    """

    def __init__(self, reader, batch_size: int, seq_len: int, rank: int, world_size: int, lengths: list[int],
                 doc_multiple: int = 1, whole_rows: bool = False):
        """lengths: the row lengths, shortest first, the last seq_len (bucket_lengths).
        whole_rows: pieces that fill a row of seq_len exactly get a pool (the last) of their own."""
        self.reader, self.rank, self.world, self.multiple = reader, rank, world_size, doc_multiple
        self.lengths = list(lengths) + ([seq_len] if whole_rows else [])
        self.whole = len(lengths) if whole_rows else None  # the index of the whole-row pool
        self.rows = [r for r, _ in bucket_shapes(batch_size, seq_len, self.lengths)]  # per rank
        self.fill = LOOKAHEAD * batch_size * seq_len * world_size  # pool tokens that trigger packing
        self.pools: list[list[tuple]] = [[] for _ in self.lengths]
        self.pool_tokens = [0] * len(self.lengths)

    # -- state: the reader's position and the pools --
    def state(self) -> dict:
        return {**self.reader.state(), "pools": [[list(p) for p in pool] for pool in self.pools]}

    def load(self, s: dict):
        self.reader.load({**s, "pending": []})
        self.pools = [[tuple(p) for p in pool] for pool in s["pools"]]
        self.pool_tokens = [sum(span(p[2], self.multiple) for p in pool) for pool in self.pools]

    @property
    def batches(self) -> int:
        return self.reader.batches

    @property
    def seed(self) -> int:
        return self.reader.seed

    def kinds(self) -> list[tuple[int, int, bool]]:
        """(rows, length, whole rows?) of every kind of micro-batch this packer can yield."""
        return [(rows, length, k == self.whole) for k, (rows, length) in enumerate(zip(self.rows, self.lengths))]

    # -- production --
    def _add(self, pieces: list[tuple]):
        for piece in pieces:
            n = span(piece[2], self.multiple)
            k = self.whole if self.whole is not None and n == self.lengths[-1] else bucket_of(n, self.lengths)
            self.pools[k].append(piece)
            self.pool_tokens[k] += n

    def _fill(self):
        while max(self.pool_tokens) < self.fill and (pieces := self.reader._read()) is not None:
            self._add(pieces)

    def _choose(self) -> int:
        """Reads the global stream until a pool holds LOOKAHEAD micro-batches of every rank (or
        the epoch is read), then names the fullest pool, the longer bucket on a tie."""
        self._fill()
        if not any(self.pools):  # the epoch is read and its rows are out: next epoch
            self.reader._next_epoch()
            self._fill()
            if not any(self.pools):
                raise ValueError(f"the {len(self.reader.files)} training shard(s) hold no document")
        return max(range(len(self.lengths)), key=lambda k: (self.pool_tokens[k], k))

    def _pack(self, k: int) -> list[list[tuple]]:
        """The W * rows[k] rows of bucket k, in order: each starts first fit from bucket k's pool,
        then fills its room first fit from the smaller buckets', shortest bucket last. The
        whole-row pool's rows hold one piece each (rows of padding once the pool runs out)."""
        length, out = self.lengths[k], []
        if k == self.whole:
            taken = self.pools[k][: self.world * self.rows[k]]
            del self.pools[k][: len(taken)]
            self.pool_tokens[k] -= len(taken) * length
            return [[p] for p in taken] + [[] for _ in range(self.world * self.rows[k] - len(taken))]
        for _ in range(self.world * self.rows[k]):
            row, room = [], length
            for j in range(k, -1, -1):  # never the whole-row pool, which comes after k
                pool = self.pools[j]
                if room < MIN_DOC or not pool:
                    continue
                head = pool[:WINDOW]
                taken, room = take_row(head, room, self.multiple)
                pool[:WINDOW] = head
                self.pool_tokens[j] -= sum(span(p[2], self.multiple) for p in taken)
                row += taken
            out.append(row)
        return out

    def next_tokens(self):
        """This rank's rows of the next micro-batch: (rows[k], lengths[k]) tokens and doc ids,
        and whether they came from the whole-row pool (attention needs no mask)."""
        k = self._choose()
        rows = self._pack(k)[self.rank :: self.world]
        tokens, docs = empty_rows(self.rows[k], self.lengths[k])
        for i, row in enumerate(rows):
            write_row(tokens, docs, i, row, self.reader._sources, self.multiple)
        return (*self.reader._count(tokens, docs, [p for pool in self.pools for p in pool]), k == self.whole)
