"""Cycle, time and energy model of the e-prop firmware on SpiNNaker 2 PEs.

Cycles are instruction counts of the loops the firmware runs, with Cortex-M4F timings
(ARM Cortex-M4 Technical Reference Manual r0p1, section 3.3 "Instruction set summary"
and section 7.2 "FPU instruction set": LDR/VLDR 2 cycles (1 more for each further
register of an LDM/VLDM), STR/VSTR 1-2, VADD/VSUB/VMUL 1, VMLA/VMLS/VFMA 3, VDIV 14,
VSQRT 14, VCVT 1, branch taken 2-4; exception entry 12 cycles). Derivations per kernel
are in docs/emulator.md. Every constant below says where it comes from; the ones
marked ESTIMATE are our engineering estimates, with the reason given there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default PE clock: the low end of SpiNNaker 2's 150-300 MHz PE range
#: (shared/DESIGN.md), so real-time at this clock holds at any faster one.
DEFAULT_CLOCK_MHZ = 150.0

#: One network step is one 10 ms audio frame (shared/DESIGN.md): the real-time budget.
STEP_BUDGET_US = 10_000.0

# ---- cycles per unit of work (fp32 storage); derivations in docs/emulator.md -------------
CYCLES = {
    # per neuron: v (VMLA + VSUB), a (VMLA), A (VMLA), compare + branch, psi (VSUB, VABS,
    # VMUL, VSUB, VMAX via compare) and 4 loads/4 stores of v, a, z, psi.
    "neuron_update": 30,
    # per input synapse (dense MAC over the frame): VLDM weight + x (~2), VMLA (3)
    "input_mac": 5,
    # per received spike and target row: VLDR weight (2), VADD into the row's input (1),
    # loop overhead amortised over an unroll of 4 (1) -> 4; plus per spike below
    "rec_add": 4,
    # per presynaptic trace (eps_in, eps_rec): VLDR, VMLA, VSTR
    "eps_vector": 6,
    # per synapse, ALIF eligibility: 3 loads (eps_a, ebar, acc) ~4 with VLDM, eps_a
    # (VMUL + VMLA = 4), e (VMLS + VMUL = 4), ebar (VMLA 3), acc (VADD 1), 3 stores (3),
    # loop/index overhead (3)
    "elig_alif": 22,
    # per synapse, LIF (no eps_a): 2 loads, e (VMUL 1), ebar (3), acc (1), 2 stores, overhead
    "elig_lif": 12,
    # per synapse, fused (no ebar): one load and store fewer and no VMLA for ebar
    "elig_alif_fused": 17,
    # per synapse, LIF fused: elig_lif with the same load, store and VMLA for ebar fewer
    "elig_lif_fused": 7,
    # per synapse of a row whose psi is 0 at t and t-1 (the kernels' skip path):
    # eps_a *= rho (VMUL), ebar *= kappa (VMUL), acc += ebar (VADD), 3 loads and 3
    # stores as VLDM/VSTM bursts (~5), overhead (2)
    "elig_skip": 10,
    # per synapse at the end of a sample: grad = coef * S (VLDR, VMUL, VSTR)
    "grad_scale": 5,
    # per synapse per step with per_step loss: grad += L * ebar (VLDR x2, VMLA, VSTR)
    "grad_accum_step": 7,
    # per synapse, Adam: 4 loads (8), m (4), v (5), VSQRT (14), scale (1), +eps (1),
    # VDIV (14), VMUL (1), VSUB (1), 3 stores (3), overhead (3)
    "adam": 55,
    # per synapse, plain SGD: load g, w; VMLS; store
    "sgd": 7,
    # per synapse, heavy-ball SGD: as sgd, plus load the buffer, VMLA it, store it
    "momentum": 10,
    # readout, per spike per readout unit: VLDR, VADD (as rec_add)
    "readout_add": 4,
    # readout, per unit per step: leak (VMLA), running sum (VADD), load/store
    "readout_unit": 8,
    # readout, per recurrent neuron per step: zbar leak (VMLA) and its running sum
    "readout_zbar": 8,
    # end of sample on the readout PE, per unit: softmax via exp accelerator (ESTIMATE 40)
    "softmax_unit": 40,
    # per recurrent neuron: L_j = sum_k B_jk err_k (n_out VMLAs, counted per (j,k))
    "lsig_mac": 5,
    # packets: send = write key (+payload) to the comms interface (ESTIMATE 8);
    # receive = interrupt entry (12, ARM TRM) + handler/dispatch (ESTIMATE 18)
    "packet_send": 8,
    "packet_recv": 30,
    # fixed overhead per timer tick: interrupt, DMA setup, barrier bookkeeping (ESTIMATE)
    "tick_overhead": 300,
}

#: Extra cycles per element loaded/stored in a narrower format: fp16 is one VCVTB (1);
#: fixed point is a sign-extending load, VMOV, VCVT and VMUL by the row scale (~3);
#: fp8 (e5m2) is a byte load, shift into the upper half and VCVTB (~3).
FORMAT_EXTRA = {"fp32": 0, "fp16": 1, "int16": 3, "int8": 3, "fp8": 3}

#: Router latency per step phase (ESTIMATE: a few hundred ns per hop through the
#: on-chip NoC, Hoeppner et al. 2021 report single-cycle router hops; we charge 1 us
#: per phase to be conservative about the barrier's synchronisation).
ROUTE_PHASE_US = 1.0

# ---- energy -----------------------------------------------------------------------------
#: Active energy per PE clock cycle, including SRAM accesses. ESTIMATE: ARM lists the
#: Cortex-M4 core at ~12 uW/MHz (12 pJ/cycle) in 40 nm LP; SpiNNaker 2's 22FDX
#: near-threshold operation lowers the core's share, SRAM and NoC interface raise it; we
#: take 20 pJ/cycle. Not a SpiNNaker 2 measurement.
ENERGY_PER_CYCLE_PJ = 20.0
#: Idle (clock-gated, body-biased) power per PE. ESTIMATE 0.1 mW: Hoeppner et al. 2019
#: (arXiv:1903.08941) report ~80 % baseline power reduction from power management on the
#: 28 nm prototype; we assume a low-leakage 22FDX PE idles around 0.1 mW.
IDLE_POWER_MW = 0.1
#: Energy per routed multicast packet (router lookup plus one NoC traversal) and per
#: delivery to a PE. ESTIMATE 20 pJ and 5 pJ: on-chip NoC energies in 22 nm are a few
#: pJ per 32-bit word per hop; not a SpiNNaker 2 measurement.
ENERGY_PER_PACKET_PJ = 20.0
ENERGY_PER_DELIVERY_PJ = 5.0


def elig_kernel(neuron: str, fused: bool) -> str:
    return f"elig_{'lif' if neuron == 'lif' else 'alif'}{'_fused' if fused else ''}"


@dataclass
class StepCost:
    """Modelled time and energy of one step (or one end-of-sample update)."""

    pe_cycles: list[int]
    packets: int
    deliveries: int
    phases: int
    clock_mhz: float

    @property
    def critical_cycles(self) -> int:
        return max(self.pe_cycles) if self.pe_cycles else 0

    def time_us(self) -> float:
        return self.critical_cycles / self.clock_mhz + self.phases * ROUTE_PHASE_US

    def energy_uj(self, budget_us: float | None) -> float:
        """Active energy of every PE, idle energy for the rest of the budget, packets."""
        return float(energy_uj(self.pe_cycles, self.packets, self.deliveries, self.clock_mhz,
                               budget_us))


def energy_uj(pe_cycles, packets, deliveries, clock_mhz: float, budget_us: float | None):
    """StepCost's energy. pe_cycles is (n_pes,) cycles, or (T, n_pes) for T steps at once
    (packets and deliveries then (T,)); the idle energy is summed PE by PE, in order."""
    cyc = np.asarray(pe_cycles)
    active = cyc.sum(axis=-1) * ENERGY_PER_CYCLE_PJ * 1e-6
    idle = 0.0
    if budget_us is not None and cyc.shape[-1]:
        idle_us = np.maximum(budget_us - cyc / clock_mhz, 0.0)
        idle = np.cumsum(IDLE_POWER_MW * idle_us * 1e-3, axis=-1)[..., -1]  # mW*us = nJ -> uJ
    net = (packets * ENERGY_PER_PACKET_PJ + deliveries * ENERGY_PER_DELIVERY_PJ) * 1e-6
    return active + idle + net
