"""The SpiNNaker 2 emulator: PEs with SRAM, a key/mask multicast router, the mapping of
the SRNN onto PEs, per-PE e-prop firmware, and the cycle / memory / energy model.

Public API: `EmulatedLearner` (same methods as `edgeprop.eprop.EpropLearner`),
`map_network` and `Chip`. See docs/emulator.md.
"""

from firmware_model.chip import Chip, MappingError, SramOverflowError
from firmware_model.learner import EmulatedLearner
from firmware_model.mapping import map_network
from firmware_model.precision import DEFAULT_PRECISION, VARIANTS

__all__ = ["Chip", "EmulatedLearner", "MappingError", "SramOverflowError", "map_network",
           "DEFAULT_PRECISION", "VARIANTS"]
