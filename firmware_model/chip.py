"""The chip: processing elements (PEs) with 128 KB of SRAM each, grouped in quad-PEs.

A PE owns only what sits in its SRAM. Every array a kernel reads or writes is
allocated here, in a named region, so the memory a mapping needs is the sum of
what the allocator handed out, not a formula that could drift from the code.

SpiNNaker 2 facts (shared/DESIGN.md; Hoeppner et al. 2021, arXiv:2103.08392; Mayr et
al. 2019, arXiv:1911.02385): 152 PEs per chip in 38 quad-PEs (QPEs), each PE an ARM
Cortex-M4F with 128 KB local SRAM for code and data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeprop.errors import ConfigError

#: Local SRAM per PE (shared/DESIGN.md; Hoeppner et al. 2021).
PE_SRAM_BYTES = 128 * 1024
#: PEs per chip and per quad-PE (shared/DESIGN.md; QPEs: Hoeppner et al. 2021).
PES_PER_CHIP = 152
PES_PER_QPE = 4

#: Named SRAM regions, in allocation order.
REGIONS = ("code", "neuron_state", "weights", "eligibility", "optimizer", "buffers")


class MappingError(ConfigError):
    """A network does not fit the chip as asked (too many PEs, a PE's SRAM, a router table)."""


class SramOverflowError(MappingError):
    """A PE needs more than its 128 KB of SRAM; names the PE and the region."""


@dataclass
class Sram:
    """A PE's local memory: a bump allocator with named regions and named arrays."""

    pe_id: int
    capacity: int = PE_SRAM_BYTES
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    region_of: dict[str, str] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)  # region -> bytes without an array

    def used(self) -> int:
        return sum(self.bytes_by_region().values())

    def bytes_by_region(self) -> dict[str, int]:
        out = {r: 0 for r in REGIONS}
        for name, arr in self.arrays.items():
            out[self.region_of[name]] += _aligned(arr.nbytes)
        for region, n in self.reserved.items():
            out[region] += _aligned(n)
        return out

    def _check(self, region: str, name: str, nbytes: int) -> None:
        if region not in REGIONS:
            raise ValueError(f"unknown SRAM region {region!r}; regions are {REGIONS}")
        need = self.used() + _aligned(nbytes)
        if need > self.capacity:
            raise SramOverflowError(
                f"PE {self.pe_id} overflows its {self.capacity}-byte SRAM in region "
                f"'{region}' ({name}: {nbytes} bytes, {need} needed in total); "
                "use more PEs (--pes) or a leaner precision (--precision)"
            )

    def alloc(self, region: str, name: str, shape, dtype) -> np.ndarray:
        """Allocate a zeroed array in `region`; SramOverflowError if the PE is full."""
        if name in self.arrays:
            raise ValueError(f"PE {self.pe_id}: array {name!r} allocated twice")
        arr = np.zeros(shape, dtype=dtype)
        self._check(region, name, arr.nbytes)
        self.arrays[name] = arr
        self.region_of[name] = region
        return arr

    def reserve(self, region: str, name: str, nbytes: int) -> None:
        """Account bytes that hold no emulated array (the firmware's code)."""
        self._check(region, name, nbytes)
        self.reserved[region] = self.reserved.get(region, 0) + int(nbytes)


def _aligned(n: int) -> int:
    """Arrays start on 4-byte words (Cortex-M4 word alignment)."""
    return (int(n) + 3) // 4 * 4


@dataclass
class PECounters:
    """Per-PE counters, cleared by `reset`."""

    cycles: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    payload_bytes_sent: int = 0

    def reset(self) -> None:
        self.cycles = self.packets_sent = self.packets_received = self.payload_bytes_sent = 0


@dataclass
class PE:
    """One processing element: an id, its quad-PE, its SRAM and its counters."""

    pe_id: int
    sram: Sram
    counters: PECounters = field(default_factory=PECounters)

    @property
    def qpe(self) -> int:
        return self.pe_id // PES_PER_QPE


class Chip:
    """A set of PEs (the first `n_pes` of one chip) at one clock frequency."""

    def __init__(self, n_pes: int, clock_mhz: float = 150.0) -> None:
        if not 1 <= int(n_pes) <= PES_PER_CHIP:
            raise MappingError(f"--pes must be between 1 and {PES_PER_CHIP}, got {n_pes}")
        if not 0 < clock_mhz <= 300:
            raise MappingError(f"clock must be in (0, 300] MHz (Cortex-M4F range), got {clock_mhz}")
        self.n_pes = int(n_pes)
        self.clock_mhz = float(clock_mhz)
        self.pes = [PE(i, Sram(i)) for i in range(self.n_pes)]

    def qpes(self) -> dict[int, list[int]]:
        """Quad-PE grouping: qpe index -> PE ids."""
        out: dict[int, list[int]] = {}
        for pe in self.pes:
            out.setdefault(pe.qpe, []).append(pe.pe_id)
        return out

    def bytes_by_region(self) -> list[dict[str, int]]:
        return [pe.sram.bytes_by_region() for pe in self.pes]
