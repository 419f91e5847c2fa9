"""Partition the SRNN across PEs, place the readout, and build the routing tables.

Partition: recurrent neuron j lives on exactly one PE; PE p owns a contiguous slice
[start_p, stop_p) of neurons with their rows of W_in and W_rec (incoming synapses),
so every synapse's weight, eligibility and optimizer state sits on its postsynaptic
PE. Slices are as even as possible (the first n_rec % n_pes PEs take one more).

Readout: one PE (the last, which has the fewest neurons) also hosts the 12 readout
units, W_out, and the learning-signal computation.

Traffic and routes (keys as in router.py):
- SPIKE from PE p (one packet per spike, key = neuron id): to every PE (all rows
  have recurrent synapses from every neuron) and the readout PE. One entry per source.
- INPUT from the host (80 payload packets per frame): to every PE owning neurons.
- LSIG from the readout PE (one payload packet per neuron): to the owner of that
  neuron; each owner's slice is covered by aligned key/mask blocks.
- OUTPUT from the readout PE (n_out payload packets per step): to the host link.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeprop.network import ModelConfig
from firmware_model.chip import MappingError
from firmware_model.router import (
    FULL_MASK,
    HOST_ID,
    INPUT,
    LSIG,
    MAX_TABLE_ENTRIES,
    OUTPUT,
    SOURCE_MASK,
    SPIKE,
    Router,
    aligned_blocks,
    make_key,
)


@dataclass
class Mapping:
    """Where every neuron lives and how packets reach it."""

    cfg: ModelConfig
    n_pes: int
    slices: list[tuple[int, int]]
    readout_pe: int
    router: Router
    owner: np.ndarray = field(repr=False)  # neuron id -> PE id

    def placement(self) -> list[dict]:
        out = []
        for p, (s, e) in enumerate(self.slices):
            roles = ["neurons"] + (["readout"] if p == self.readout_pe else [])
            out.append({"pe": p, "qpe": p // 4, "neurons": [s, e], "n_neurons": e - s,
                        "roles": roles})
        return out

    def table_summary(self) -> dict:
        kinds = {"spike": 0, "input": 0, "learning_signal": 0, "output": 0}
        names = {SPIKE: "spike", INPUT: "input", LSIG: "learning_signal", OUTPUT: "output"}
        for e in self.router.entries:
            kinds[names[e.key >> 28]] += 1
        return {"entries": len(self.router.entries), "capacity": self.router.max_entries,
                "by_kind": kinds}


def partition(n_rec: int, n_pes: int) -> list[tuple[int, int]]:
    base, extra = divmod(n_rec, n_pes)
    out, s = [], 0
    for p in range(n_pes):
        n = base + (1 if p < extra else 0)
        out.append((s, s + n))
        s += n
    return out


def map_network(
    cfg: ModelConfig, n_pes: int = 12, *, max_table_entries: int = MAX_TABLE_ENTRIES
) -> Mapping:
    """Partition, place and route `cfg` on `n_pes` PEs; MappingError if it cannot."""
    n_pes = int(n_pes)
    if n_pes < 1:
        raise MappingError(f"need at least 1 PE, got {n_pes}")
    if n_pes > cfg.n_rec:
        raise MappingError(
            f"{n_pes} PEs for {cfg.n_rec} recurrent neurons: every PE must own at least "
            f"one neuron; use --pes {cfg.n_rec} or fewer"
        )
    if cfg.n_rec > 0xFFFF or cfg.n_in > 0xFFFF or n_pes >= HOST_ID:
        raise MappingError("network too large for the 16-bit index field of the keys")
    slices = partition(cfg.n_rec, n_pes)
    readout_pe = n_pes - 1
    owner = np.empty(cfg.n_rec, dtype=np.int64)
    for p, (s, e) in enumerate(slices):
        owner[s:e] = p
    router = Router(n_pes, max_entries=max_table_entries)
    everyone = list(range(n_pes))
    for p in range(n_pes):
        router.add(make_key(SPIKE, p), SOURCE_MASK, everyone)
    router.add(make_key(INPUT, HOST_ID), SOURCE_MASK, everyone)
    for p, (s, e) in enumerate(slices):
        for base, size in aligned_blocks(s, e):
            mask = (FULL_MASK & ~(size - 1)) & FULL_MASK
            router.add(make_key(LSIG, readout_pe, base), mask, [p])
    router.add(make_key(OUTPUT, readout_pe), SOURCE_MASK, [router.host])
    m = Mapping(cfg, n_pes, slices, readout_pe, router, owner)
    router.compile(np.concatenate(emitted_keys(m)))
    return m


def emitted_keys(m: Mapping) -> list[np.ndarray]:
    """Every key the mapping's firmware can send (for the router's lookup cache)."""
    cfg = m.cfg
    out = [make_key(SPIKE, p, np.arange(s, e)) for p, (s, e) in enumerate(m.slices)]
    out.append(make_key(INPUT, HOST_ID, np.arange(cfg.n_in)))
    out.append(make_key(LSIG, m.readout_pe, np.arange(cfg.n_rec)))
    out.append(make_key(OUTPUT, m.readout_pe, np.arange(cfg.n_out)))
    return [np.asarray(k, dtype=np.uint32) for k in out]
