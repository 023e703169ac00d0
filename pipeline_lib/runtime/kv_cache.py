"""The LM's KV caches: the past keys and values the step model is fed, and their attention mask.

* `KVCache`: one generate() call's batch (rows only leave: `select`).
* `StateCache`: the same interface for a stateful backend (the keys and values live in OpenVINO state).
* `SlotCache`: a serving batch whose rows join and leave between steps (BatchScheduler).

The contract shared by all three: arrays [rows, kv_heads, width, head_dim] per past input, the
width a multiple of `bucket`; columns a row has no token in (left padding, gaps) are masked with
attention_mask 0; the step model's attention_mask has width + 1 columns, the new token last.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["KV_BUCKET", "KVCache", "StateCache", "SlotCache"]

KV_BUCKET = 64  # the KV cache's width grows in steps of this many columns


def _checked_bucket(bucket: int) -> int:
    if bucket < 1:
        raise ValueError(f"kv_bucket must be >= 1, got {bucket}")
    return int(bucket)


class KVCache:
    """The past keys and values of every layer, in arrays [B, kv_heads, width, head_dim] whose width
    is a multiple of `bucket`. Columns [0, used) hold the tokens so far (left-padded rows have
    mask 0 in their padding columns); columns [used, width) are zero and masked out. `feed()` gives
    the step model's past_* inputs and attention_mask (width + 1 columns: the new token last)."""

    def __init__(self, past_names: Sequence[str], kv: Sequence[np.ndarray], mask: np.ndarray, bucket: int = KV_BUCKET) -> None:
        self.past_names, self.bucket = list(past_names), _checked_bucket(bucket)
        self.used = mask.shape[1]
        self._alloc(list(kv), mask, self.used)

    def _alloc(
        self,
        layers: list[np.ndarray],
        mask: np.ndarray,
        used: int,
        take: Callable[[np.ndarray], np.ndarray] = lambda a: a,
    ) -> None:
        """Fresh arrays with room for at least one more column, holding the first `used` columns of
        `take(layer)` for each layer, and of `mask`. `layers` is replaced in place, one layer at a
        time, so each old array is dropped as soon as it is copied: the transient memory is one
        layer's array, not a second copy of the whole cache (8 rows at 320 columns: 45 MiB)."""
        width = -(-(used + 1) // self.bucket) * self.bucket
        rows = mask.shape[0]
        for i in range(len(layers)):
            p = take(layers[i])
            a = np.zeros((rows, p.shape[1], width, p.shape[3]), dtype=np.float32)
            a[:, :, :used] = p[:, :, :used]
            layers[i] = a
        self.arrays = layers
        self.mask = np.zeros((rows, width + 1), dtype=np.int64)
        self.mask[:, :used] = mask[:, :used]
        self.mask[:, width] = 1  # the new token's column
        self.used = used

    @property
    def width(self) -> int:
        return self.mask.shape[1] - 1

    def feed(self) -> dict[str, np.ndarray]:
        feed = dict(zip(self.past_names, self.arrays))
        feed["attention_mask"] = self.mask
        return feed

    def append(self, new: Sequence[np.ndarray]) -> None:
        """Store the new token's key / value (each new_* output, [B, kv_heads, 1, head_dim])."""
        col = self.used
        for a, p in zip(self.arrays, new):
            a[:, :, col] = p[:, :, -1]
        self.mask[:, col] = 1
        self.used += 1
        if self.used == self.width:
            self._alloc(self.arrays, self.mask, self.used)

    def select(self, idx: np.ndarray, bucket: int | None = None) -> None:
        """Keep rows `idx`, and drop the leading columns none of them attends to; `bucket`, if given,
        becomes the width step from here on."""
        if bucket is not None:
            self.bucket = _checked_bucket(bucket)
        mask = self.mask[idx, : self.used]
        first = int(np.argmax(mask.any(axis=0)))
        used = self.used - first
        end = self.used
        self._alloc(self.arrays, mask[:, first:], used, take=lambda a: a[idx, :, first:end])


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



class SlotCache:
    """The running batch's KV cache: arrays [slots, kv_heads, width, head_dim] per past input,
    whose first `rows` rows are the batch (slots double as rows join, up to `capacity`), fed as views of those rows (so a row can join or leave
    without copying the others). All rows share `used` columns, left-padded (attention_mask 0 where
    a row has no token); the width grows in steps of `bucket` columns, and leading columns no row
    attends to are dropped when it grows. A row that leaves is replaced by the last row (one
    row's copy); a row that joins is written into the next slot, right-aligned; only a prompt
    longer than `used` makes every row move (columns are prepended). A step of the batch's tail
    rows only (the scheduler's first-audio lane) leaves a masked column in the other rows: a gap
    inside a row, which attention skips like the padding; gaps go with the leading columns once no
    row attends to them."""

    def __init__(self, past_names: Sequence[str], capacity: int, kv_heads: int, head_dim: int, bucket: int) -> None:
        self.past_names = list(past_names)
        self.capacity, self.kv_heads, self.head_dim, self.bucket = capacity, kv_heads, head_dim, bucket
        self.rows = 0
        self.used = 0
        self.slots = 0
        self.arrays: list[np.ndarray] = []
        self.mask = np.zeros((0, 1), dtype=np.int64)
        self._views: dict[str, np.ndarray] | None = None

    @property
    def width(self) -> int:
        return self.mask.shape[1] - 1

    def _realloc(self, used: int, shift: int, first: int = 0, slots: int | None = None) -> None:
        """New arrays holding columns [first, self.used) of the current ones at [shift, shift + ...),
        with room for `used` columns and one more, and for `slots` rows (default: as now)."""
        width = -(-(used + 1) // self.bucket) * self.bucket
        self.slots = slots if slots is not None else self.slots
        keep = self.used - first
        arrays = []
        for i in range(len(self.past_names)):
            a = np.zeros((self.slots, self.kv_heads, width, self.head_dim), dtype=np.float32)
            if self.arrays and keep > 0:
                a[: self.rows, :, shift:shift + keep] = self.arrays[i][: self.rows, :, first:self.used]
                self.arrays[i] = None  # type: ignore[call-overload] - freed layer by layer
            arrays.append(a)
        mask = np.zeros((self.slots, width + 1), dtype=np.int64)
        if keep > 0:
            mask[: self.rows, shift:shift + keep] = self.mask[: self.rows, first:self.used]
        mask[:, width] = 1  # the new token's column
        self.arrays, self.mask, self.used = arrays, mask, used
        self._views = None

    def add(self, kv: Sequence[np.ndarray]) -> int:
        """A prefilled row ([1, kv_heads, n, head_dim] per past input) into the next slot; its index."""
        n = kv[0].shape[2]
        if self.rows >= self.capacity:
            raise RuntimeError("SlotCache is full")
        if self.rows == 0:
            self.arrays, self.used = [], 0
            self._realloc(n, 0, slots=1)
        elif n > self.used or self.rows == self.slots:  # a longer prompt, or no free slot: move once
            self._realloc(max(n, self.used), max(0, n - self.used),
                          slots=min(self.capacity, 2 * self.slots) if self.rows == self.slots else None)
        r, start = self.rows, self.used - n
        for a, k in zip(self.arrays, kv):
            a[r] = 0.0
            a[r, :, start:self.used] = k[0]
        self.mask[r, :] = 0
        self.mask[r, start:self.used] = 1
        self.mask[r, self.width] = 1
        self.rows += 1
        self._views = None
        return r

    def remove(self, r: int) -> int | None:
        """Drop row r; the last row moves into its slot. Returns the moved row's old index (None if
        r was the last)."""
        last = self.rows - 1
        moved = None
        if r != last:
            for a in self.arrays:
                a[r] = a[last]
            self.mask[r] = self.mask[last]
            moved = last
        self.rows -= 1
        self._views = None
        if self.rows == 0:  # idle: give the memory back
            self.arrays, self.used, self.slots = [], 0, 0
            self.mask = np.zeros((0, 1), dtype=np.int64)
        return moved

    def take(self, r: int) -> tuple[list[np.ndarray], int | None]:
        """Row r leaves with its own history: ([1, kv_heads, n, head_dim] per past input, the columns
        it attends to, gaps and padding dropped) and the moved row's old index (as `remove`). `add`
        of that list later gives the row the same attention it had (positions are the caller's)."""
        cols = np.flatnonzero(self.mask[r, : self.used])
        kv = [np.ascontiguousarray(a[r: r + 1, :, cols]) for a in self.arrays]
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

    def append(self, new: Sequence[np.ndarray], lo: int = 0) -> None:
        """The step's key / value per layer ([rows - lo, kv_heads, 1, head_dim]) of rows [lo, rows)
        into column `used`; rows before `lo` did not step: their column stays masked (a gap, which
        attention skips like the left padding)."""
        col = self.used
        for a, k in zip(self.arrays, new):
            a[lo: self.rows, :, col] = k[:, :, -1]
        self.mask[lo: self.rows, col] = 1
        self.used += 1
        if self.used == self.width:
            live = self.mask[: self.rows, : self.used].any(axis=0)
            first = int(np.argmax(live)) if live.any() else 0
            self._realloc(self.used - first, 0, first)
