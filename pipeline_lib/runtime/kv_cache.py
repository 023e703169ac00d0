"""The LM's KV caches: the past keys and values the step model is fed, and their attention mask.

* `KVCache`: one generate() call's batch (rows only leave: `select`).
* `StateCache`: the same interface for a stateful backend (the keys and values live in OpenVINO state).
* `SlotCache`: a serving batch whose rows join and leave between steps (BatchScheduler).
* `prefill_row`: one prompt through the step model alone, its keys / values as a row for either cache.

The contract of KVCache and SlotCache (the one place it is written; docs/design.md, "The attention core"):
arrays [rows, kv_heads, width, head_dim] per past input, the width a multiple of `bucket` and larger
than the longest row; row r's tokens fill columns [0, len_r) of its row, in order, with no gaps and no
padding (rows of different lengths share a batch: each attends only its own length). Two kinds of step
model read it (`in_place`, from the LM config's "kv_cache"):

- the fused ONNX Runtime graph (registry.KV_CACHE_BUFFER): past_* are buffers the model writes the new
  token's key / value into, at column len_r, in place (its present_* outputs alias past_*:
  GroupQueryAttention's shared buffer); attention_mask is [rows, width], ones in [0, len_r + 1), and
  the row sums - 1 are the rows' lengths (GroupQueryAttention's seqlens_k; positions = columns);
- the traced step graph (registry.KV_CACHE_INPUTS, OpenVINO's plain IR): attention_mask is
  [rows, width + 1], ones in [0, len_r) and in the last column (the new token); the new_* outputs are
  written into column len_r here (`append`).

Either way each row's position of the next token is len_r, so a row keeps its positions when it leaves
the batch with its columns and joins again (`SlotCache.take` / `add`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline_lib.runtime.backend_base import release_free_heap

__all__ = ["KV_BUCKET", "KVCache", "StateCache", "SlotCache", "prefill_row"]

KV_BUCKET = 64  # the KV cache's width grows in steps of this many columns
# A prefill of this many prompt tokens or more hands the heap's freed pages back (release_free_heap)
TRIM_AFTER_PREFILL_TOKENS = 128


def _checked_bucket(bucket: int) -> int:
    if bucket < 1:
        raise ValueError(f"kv_bucket must be >= 1, got {bucket}")
    return int(bucket)


def _width_for(longest: int, bucket: int) -> int:
    """The smallest multiple of `bucket` with room for `longest` tokens and one more."""
    return -(-(longest + 1) // bucket) * bucket


def prefill_row(lm: Any, spec: Any, prompt: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Run one prompt alone through the step model (nothing cached before it). Returns its keys / values
    ([1, kv_heads, n, head_dim] per past input, columns [0, n): a row for KVCache / SlotCache), and the
    last position's logits [vocab] and hidden state [hidden]. `spec`: runtime.generate.LMSpec.
    A prompt of TRIM_AFTER_PREFILL_TOKENS or more then hands the heap's freed pages back
    (release_free_heap): its prefill leaves MiBs of freed heap resident, which a server's parked
    rows would otherwise keep; shorter prompts, the usual sentence, skip the trim's few ms."""
    ids = np.asarray(prompt, dtype=np.int64)[None]
    n = ids.shape[1]
    feed = {"input_ids": ids, "position_ids": np.arange(n, dtype=np.int64)[None]}
    if spec.in_place:  # a buffer with room for the prompt; the model writes columns [0, n)
        width = _width_for(n, KV_BUCKET)
        bufs = [np.zeros((1, spec.num_kv_heads, width, spec.head_dim), dtype=np.float32) for _ in spec.past_names]
        mask = np.zeros((1, width), dtype=np.int64)
        mask[0, :n] = 1
        feed["attention_mask"] = mask
        feed.update(zip(spec.past_names, bufs))
        out = lm.run(feed)
        kv = [b[:, :, :n] for b in bufs]
    else:
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
        feed["attention_mask"] = np.ones_like(ids)
        feed.update((name, empty) for name in spec.past_names)
        out = lm.run(feed)
        kv = [np.array(out[name], dtype=np.float32) for name in spec.new_kv_names]
    logits = np.array(out["logits"][0, -1], dtype=np.float32)
    hidden = np.array(out["hidden_states"][0, -1], dtype=np.float32)
    if n >= TRIM_AFTER_PREFILL_TOKENS:
        del out
        release_free_heap()
    return kv, logits, hidden


class _Rows:
    """What KVCache and SlotCache share: the arrays, the rows' lengths and the mask, in the module's
    contract. The arrays hold `slots` rows (>= the rows in use)."""

    def __init__(self, past_names: Sequence[str], bucket: int, in_place: bool) -> None:
        self.past_names, self.bucket, self.in_place = list(past_names), _checked_bucket(bucket), bool(in_place)
        self.arrays: list[np.ndarray] = []
        self.lens = np.zeros(0, dtype=np.int64)
        self.mask = np.zeros((0, 0 if in_place else 1), dtype=np.int64)

    @property
    def width(self) -> int:
        return self.mask.shape[1] - (0 if self.in_place else 1)

    @property
    def used(self) -> int:
        """The longest row's length."""
        return int(self.lens.max()) if len(self.lens) else 0

    def _set_mask_rows(self, lo: int, hi: int) -> None:
        """Rows [lo, hi)'s mask from their lengths."""
        m = self.mask[lo:hi]
        m[:] = 0
        cols = np.arange(self.width)[None, :]
        extra = 1 if self.in_place else 0  # the in-place model's new column len_r
        m[:, : self.width] = cols < (self.lens[lo:hi, None] + extra)
        if not self.in_place:
            m[:, self.width] = 1

    def _alloc(self, slots: int, width: int, rows: int, src: list[np.ndarray] | None, take=None) -> None:
        """Fresh arrays of `slots` rows and `width` columns holding the first `rows` rows of `src` (rows
        picked by `take`, default the first ones), layer by layer (each old array freed once copied)."""
        arrays = list(src) if src is not None else []
        for i in range(len(arrays)):
            p = arrays[i]
            p = p[take] if take is not None else p[:rows]
            keep = min(width, p.shape[2])
            a = np.zeros((slots, p.shape[1], width, p.shape[3]), dtype=np.float32)
            a[:rows, :, :keep] = p[:, :, :keep]
            for r in np.flatnonzero(self.lens[:rows] < keep):  # a row's columns past its length stay zero
                a[r, :, self.lens[r]:keep] = 0.0
            arrays[i] = a
        self.arrays = arrays
        self.mask = np.zeros((slots, width + (0 if self.in_place else 1)), dtype=np.int64)
        self._set_mask_rows(0, rows)

    def _step(self, new: Sequence[np.ndarray], lo: int, hi: int) -> None:
        """Rows [lo, hi) stepped: their new column (new_*, [hi - lo, kv_heads, 1, head_dim], for the
        traced model; already written by the in-place model) becomes theirs."""
        lens = self.lens[lo:hi]
        if not self.in_place:
            idx = np.arange(lo, hi)
            for a, k in zip(self.arrays, new):
                a[idx, :, lens] = k[:, :, -1]
            self.mask[idx, lens] = 1
        lens += 1
        if self.in_place:
            full = lens >= self.width
            self.mask[np.arange(lo, hi)[~full], lens[~full]] = 1


class KVCache(_Rows):
    """One generate() call's cache (the module's contract): `kv` holds each row's tokens in columns
    [0, lens[r]) of arrays [B, kv_heads, any width, head_dim]. `feed()` gives the step model's past_*
    inputs and attention_mask; `append` takes a step of every row; the width grows as `_grown_width` says."""

    def __init__(self, past_names: Sequence[str], kv: Sequence[np.ndarray], lens: Sequence[int],
                 bucket: int = KV_BUCKET, in_place: bool = False) -> None:
        super().__init__(past_names, bucket, in_place)
        self.lens = np.array(lens, dtype=np.int64)
        rows = len(self.lens)
        self.mask = np.zeros((rows, 0 if in_place else 1), dtype=np.int64)
        self._alloc(rows, _width_for(self.used, self.bucket), rows, list(kv))

    def feed(self) -> dict[str, np.ndarray]:
        feed = dict(zip(self.past_names, self.arrays))
        feed["attention_mask"] = self.mask
        return feed

    def append(self, new: Sequence[np.ndarray] = ()) -> None:
        """Every row stepped: the new token's key / value (the traced model's new_* outputs, [B, kv_heads,
        1, head_dim]; nothing for the in-place model, which wrote them) is its next column."""
        self._step(new, 0, len(self.lens))
        if self.used == self.width:
            self._alloc(len(self.lens), self._grown_width(), len(self.lens), self.arrays)

    def _grown_width(self) -> int:
        """The width when the cache is full: a bucket more for a masked model (every column costs
        attention time), half the width more (a multiple of the bucket) for the in-place one, whose
        attention reads each row's own length only: fewer whole-cache copies as rows grow long."""
        if not self.in_place:
            return _width_for(self.used, self.bucket)
        return _width_for(max(self.used, self.width + self.width // 2 - 1), self.bucket)

    def select(self, idx: np.ndarray, bucket: int | None = None) -> None:
        """Keep rows `idx` (the width shrinks to what the longest of them needs); `bucket`, if given,
        becomes the width step from here on."""
        if bucket is not None:
            self.bucket = _checked_bucket(bucket)
        idx = np.asarray(idx)
        self.lens = self.lens[idx]
        self._alloc(len(idx), _width_for(self.used, self.bucket), len(idx), self.arrays, take=idx)


class StateCache:
    """The cache of a stateful backend (OpenVINO state, see pipeline_lib.openvino_stateful): the keys and
    values live in the backend; here only what the step model is fed about them. Same interface as
    KVCache. The state holds `used` columns per row (left padding included), so each call's
    attention_mask has used + 1 columns, the new token last; beam_idx names the rows of the previous
    call's state that go on (all of them, except on the step after rows finish). Columns cannot be
    dropped from the state, so `select` keeps the leading ones that no remaining row needs, masked."""

    def __init__(self, mask: np.ndarray, bucket: int = KV_BUCKET) -> None:
        self.bucket = _checked_bucket(bucket)
        self.used = mask.shape[1]
        self._alloc(mask)
        self._every = np.arange(mask.shape[0], dtype=np.int32)  # beam_idx when every row goes on
        self.beam = self._every

    def _alloc(self, mask: np.ndarray) -> None:
        """A mask buffer with room for the tokens so far and at least one more, in steps of `bucket`."""
        width = -(-(self.used + 1) // self.bucket) * self.bucket
        self.mask = np.zeros((mask.shape[0], width), dtype=np.int64)
        self.mask[:, : self.used] = mask[:, : self.used]

    @property
    def width(self) -> int:
        return self.used

    def feed(self) -> dict[str, np.ndarray]:
        self.mask[:, self.used] = 1  # the new token's column
        feed = {"attention_mask": self.mask[:, : self.used + 1], "beam_idx": self.beam}
        self.beam = self._every  # from the next call on: every row (the same array: no re-binding)
        return feed

    def append(self, new: Sequence[np.ndarray] = ()) -> None:
        """The step's key / value went into the backend's state: one more column."""
        self.used += 1
        if self.used + 1 > self.mask.shape[1]:
            self._alloc(self.mask)

    def select(self, idx: np.ndarray, bucket: int | None = None) -> None:
        """Keep rows `idx` (the next call's beam_idx makes the state follow)."""
        if bucket is not None:
            self.bucket = _checked_bucket(bucket)
        self.mask = self.mask[idx]
        self.beam = np.asarray(idx, dtype=np.int32)
        self._every = np.arange(len(idx), dtype=np.int32)




class SlotCache(_Rows):
    """The running batch's cache (the module's contract): arrays [slots, kv_heads, width, head_dim] per
    past input whose first `rows` rows are the batch (slots double as rows join, up to `capacity`), fed
    as views of those rows (so a row can join or leave without copying the others). A row that joins is
    written into the next slot at columns [0, n); one that leaves is replaced by the last row (one row's
    copy); the width grows by `bucket` when the longest row fills it, and shrinks when rows leave. A
    step of the batch's tail rows only (the scheduler's first-audio lane) leaves the other rows as they
    were: they do not grow."""

    def __init__(self, past_names: Sequence[str], capacity: int, kv_heads: int, head_dim: int, bucket: int,
                 in_place: bool = False) -> None:
        super().__init__(past_names, bucket, in_place)
        self.capacity, self.kv_heads, self.head_dim = capacity, kv_heads, head_dim
        self.rows = 0
        self.slots = 0
        self._views: dict[str, np.ndarray] | None = None

    @classmethod
    def for_spec(cls, spec: Any, capacity: int, bucket: int = KV_BUCKET) -> SlotCache:
        """The cache for the step model `spec` (runtime.generate.LMSpec) describes."""
        return cls(spec.past_names, capacity, spec.num_kv_heads, spec.head_dim, bucket, in_place=spec.in_place)

    def _realloc(self, slots: int, longest: int) -> None:
        if not self.arrays:
            self.arrays = [np.zeros((0, self.kv_heads, 0, self.head_dim), dtype=np.float32) for _ in self.past_names]
        lens = np.zeros(slots, dtype=np.int64)
        lens[: self.rows] = self.lens[: self.rows]
        self.slots = slots
        self._alloc(slots, _width_for(longest, self.bucket), self.rows, self.arrays)
        self.lens = lens
        self._views = None

    def add(self, kv: Sequence[np.ndarray]) -> int:
        """A prefilled row ([1, kv_heads, n, head_dim] per past input) into the next slot; its index."""
        n = kv[0].shape[2]
        if self.rows >= self.capacity:
            raise RuntimeError("SlotCache is full")
        if self.rows == self.slots or n >= self.width:  # no free slot, or a longer prompt: move once
            slots = min(self.capacity, max(1, 2 * self.slots)) if self.rows == self.slots else self.slots
            self._realloc(slots, max(n, self.used))
        r = self.rows
        for a, k in zip(self.arrays, kv):
            a[r] = 0.0
            a[r, :, :n] = k[0]
        self.lens[r] = n
        self.rows += 1
        self._set_mask_rows(r, r + 1)
        self._views = None
        return r

    @property
    def used(self) -> int:
        return int(self.lens[: self.rows].max()) if self.rows else 0

    def remove(self, r: int) -> int | None:
        """Drop row r; the last row moves into its slot. Returns the moved row's old index (None if
        r was the last)."""
        last = self.rows - 1
        moved = None
        if r != last:
            for a in self.arrays:
                a[r] = a[last]
            self.mask[r] = self.mask[last]
            self.lens[r] = self.lens[last]
            moved = last
        self.lens[last] = 0
        self.rows -= 1
        self._views = None
        if self.rows == 0:  # idle: give the memory back
            self.arrays, self.slots = [], 0
            self.lens = np.zeros(0, dtype=np.int64)
            self.mask = np.zeros((0, 0 if self.in_place else 1), dtype=np.int64)
        elif _width_for(self.used, self.bucket) < self.width:  # the longest row left: narrower arrays
            self._realloc(self.slots, self.used)
        return moved

    def take(self, r: int) -> tuple[list[np.ndarray], int | None]:
        """Row r leaves with its own history ([1, kv_heads, n, head_dim] per past input) and the moved
        row's old index (as `remove`). `add` of that list later gives the row the same attention and
        positions it had."""
        n = int(self.lens[r])
        kv = [a[r: r + 1, :, :n].copy() for a in self.arrays]  # a copy: the slot is reused
        return kv, self.remove(r)

    def feed(self, lo: int = 0) -> dict[str, np.ndarray]:
        """past_* and attention_mask for rows [lo, rows) (for lo 0, the same view objects until the
        batch changes, so a backend that binds by address re-binds nothing)."""
        if lo:
            views = {name: a[lo:self.rows] for name, a in zip(self.past_names, self.arrays)}
            views["attention_mask"] = self.mask[lo:self.rows]
            return views
        if self._views is None:
            self._views = dict(zip(self.past_names, (a[: self.rows] for a in self.arrays)))
            self._views["attention_mask"] = self.mask[: self.rows]
        return dict(self._views)

    def swap(self, i: int, j: int) -> None:
        """Rows i and j trade slots (their cache and mask rows are copied; the views stay valid)."""
        for a in self.arrays:
            a[[i, j]] = a[[j, i]]
        self.mask[[i, j]] = self.mask[[j, i]]
        self.lens[[i, j]] = self.lens[[j, i]]

    def append(self, new: Sequence[np.ndarray] = (), lo: int = 0) -> None:
        """Rows [lo, rows) stepped (the traced model's new_* per layer, [rows - lo, kv_heads, 1,
        head_dim], go into each row's column len_r; the in-place model wrote them); rows before `lo`
        did not step and stay as they were."""
        self._step(new, lo, self.rows)
        if self.used == self.width:
            self._realloc(self.slots, self.used)
