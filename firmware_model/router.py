"""Multicast router: 32-bit keys matched against a bounded key/mask table.

A packet is a 32-bit routing key, optionally with a 32-bit payload. The router
sends a packet to the targets of the *first* table entry with
`packet_key & entry.mask == entry.key` (SpiNNaker's priority-ordered CAM); a packet
no entry matches is dropped, which here is an error (a mapping bug, not traffic).

Key layout used by the mapping (bits)::

    31..28 kind   (SPIKE, INPUT, LSIG, OUTPUT)
    27..16 source (PE id, or HOST_ID for the host link)
    15..0  index  (global neuron id, input channel or readout unit)

Packets travel in batches: one (keys, payloads) array pair per PE per phase, so the
hot path holds no per-packet Python objects, while routing still happens per key.
Targets are PE ids 0..n_pes-1 plus one extra target, the host link.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from firmware_model.chip import MappingError

#: SpiNNaker 2 multicast routing table size (shared/DESIGN.md).
MAX_TABLE_ENTRIES = 16384

SPIKE, INPUT, LSIG, OUTPUT = 0, 1, 2, 3
KIND_NAMES = {SPIKE: "spike", INPUT: "input", LSIG: "learning_signal", OUTPUT: "output"}
HOST_ID = 0xFFF
SOURCE_MASK = 0xFFFF0000
FULL_MASK = 0xFFFFFFFF


def make_key(kind: int, source: int, index: int | np.ndarray = 0):
    """Pack (kind, source, index) into 32-bit keys (vectorised over index)."""
    base = (int(kind) << 28) | ((int(source) & 0xFFF) << 16)
    if isinstance(index, np.ndarray):
        return (np.uint32(base) | index.astype(np.uint32)).astype(np.uint32)
    return base | int(index)


def key_kind(keys: np.ndarray) -> np.ndarray:
    return (keys >> np.uint32(28)).astype(np.int64)


def key_index(keys: np.ndarray) -> np.ndarray:
    return (keys & np.uint32(0xFFFF)).astype(np.int64)


class RoutingError(MappingError):
    """A packet matched no entry, or a table exceeds the router's capacity."""


@dataclass(frozen=True)
class Entry:
    key: int
    mask: int
    targets: tuple[int, ...]  # PE ids; n_pes stands for the host link

    def matches(self, keys: np.ndarray) -> np.ndarray:
        return (keys & np.uint32(self.mask)) == np.uint32(self.key)


def aligned_blocks(start: int, stop: int) -> list[tuple[int, int]]:
    """Cover [start, stop) by maximal power-of-two aligned blocks: (base, size) pairs.

    Each block is one key/mask entry (mask clears the low log2(size) bits), so a
    contiguous slice of neurons costs O(log n) table entries.
    """
    out = []
    i = start
    while i < stop:
        size = 1
        while i % (size * 2) == 0 and i + size * 2 <= stop:
            size *= 2
        out.append((i, size))
        i += size
    return out


class Router:
    """A bounded key/mask table with batch delivery and traffic counters."""

    def __init__(self, n_pes: int, max_entries: int = MAX_TABLE_ENTRIES) -> None:
        self.n_pes = n_pes
        self.host = n_pes
        self.max_entries = int(max_entries)
        self.entries: list[Entry] = []
        self._cache_keys = np.zeros(0, dtype=np.uint32)
        self._cache_dest = np.zeros((0, n_pes + 1), dtype=bool)
        self.packets_routed = 0
        self.deliveries = 0
        self.by_kind = {name: 0 for name in KIND_NAMES.values()}
        self._batch_cache: dict[bytes, tuple] = {}

    def add(self, key: int, mask: int, targets) -> None:
        if len(self.entries) >= self.max_entries:
            raise RoutingError(
                f"router table full: {self.max_entries} entries; the mapping needs more"
            )
        if key & ~mask & FULL_MASK:
            raise ValueError(f"entry key {key:#010x} has bits outside mask {mask:#010x}")
        self.entries.append(Entry(int(key), int(mask), tuple(sorted(set(int(t) for t in targets)))))
        self._batch_cache.clear()

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Route by the table itself: (n_packets, n_pes + 1) bool, first match wins."""
        keys = np.asarray(keys, dtype=np.uint32)
        dest = np.zeros((keys.size, self.n_pes + 1), dtype=bool)
        done = np.zeros(keys.size, dtype=bool)
        for e in self.entries:
            hit = e.matches(keys) & ~done
            if hit.any():
                dest[np.ix_(hit, list(e.targets))] = True
                done |= hit
        if not done.all():
            bad = keys[~done][0]
            raise RoutingError(f"packet with key {int(bad):#010x} matches no routing entry")
        return dest

    def compile(self, keys: np.ndarray) -> None:
        """Precompute routes of the keys a mapping can emit (a lookup cache of the table)."""
        k = np.unique(np.asarray(keys, dtype=np.uint32))
        self._cache_keys = k
        self._cache_dest = self.lookup(k)

    def route(self, keys: np.ndarray) -> np.ndarray:
        """Destination matrix for a batch of keys (cache first, table for the rest)."""
        keys = np.asarray(keys, dtype=np.uint32)
        if keys.size == 0:
            return np.zeros((0, self.n_pes + 1), dtype=bool)
        pos = np.searchsorted(self._cache_keys, keys)
        pos_c = np.minimum(pos, max(self._cache_keys.size - 1, 0))
        known = (self._cache_keys.size > 0) & (self._cache_keys[pos_c] == keys)
        if known.all():
            return self._cache_dest[pos_c]
        dest = np.empty((keys.size, self.n_pes + 1), dtype=bool)
        dest[known] = self._cache_dest[pos_c[known]]
        dest[~known] = self.lookup(keys[~known])
        return dest

    def deliver(self, keys: np.ndarray, payloads: np.ndarray) -> list[tuple]:
        """Route one batch; per target (PEs, then the host) (keys, payloads, kind, index).

        Packets keep their order (per source, ascending key), as the firmware sees them.
        kind is the packet kind when the batch holds one kind, else -1; index is the
        keys' low 16 bits (decoded once per batch instead of once per receiving PE).
        """
        n = int(keys.size)
        if n == 0:
            return [(keys, payloads, -1, keys)] * (self.n_pes + 1)
        sig = keys.tobytes()
        hit = self._batch_cache.get(sig)
        if hit is None:
            # a batch seen before (the input frame every tick, a repeated spike pattern)
            # reuses its table lookups; the cache is only a memo of `route`
            dest = self.route(keys)
            counts = np.bincount(keys >> np.uint32(28), minlength=len(KIND_NAMES))
            kind = int(keys[0] >> np.uint32(28)) if counts.max() == n else -1
            same = bool((dest == dest[0]).all())
            hit = (dest, counts, kind, same, int(dest[0].sum()) if same else int(dest.sum()),
                   keys & np.uint32(0xFFFF))
            if len(self._batch_cache) > 4096:
                self._batch_cache.clear()
            self._batch_cache[sig] = hit
        dest, counts, kind, same, n_deliv, idx = hit
        self.packets_routed += n
        for kd, c in enumerate(counts[: len(KIND_NAMES)]):
            if c:
                self.by_kind[KIND_NAMES[kd]] += int(c)
        empty = (keys[:0], payloads[:0], kind, idx[:0])
        if same:  # one multicast set for the whole batch
            self.deliveries += n * n_deliv
            full = (keys, payloads, kind, idx)
            return [full if d else empty for d in dest[0]]
        self.deliveries += n_deliv
        out = []
        for t in range(self.n_pes + 1):
            col = dest[:, t]
            out.append((keys[col], payloads[col], kind, idx[col]) if col.any() else empty)
        return out

    def count(self, kind: int, packets, deliveries) -> None:
        """Add traffic routed elsewhere (a whole sample's, by the emulator's fast path)."""
        self.packets_routed += int(packets)
        self.deliveries += int(deliveries)
        self.by_kind[KIND_NAMES[kind]] += int(packets)

    def reset_counters(self) -> None:
        self.packets_routed = 0
        self.deliveries = 0
        self.by_kind = {name: 0 for name in KIND_NAMES.values()}
