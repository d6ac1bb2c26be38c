"""When the density pre-pass that culls marched samples pays for itself.

The pre-pass (nerfacc's sigma_fn) evaluates the density at every sample the march returns and
drops those behind surfaces (transmittance < early_stop_eps): work saved in the full evaluation
of the field, at the price of a density-only evaluation of every candidate. With alpha_thre = 0
and early_stop_eps no larger than the compositing's transmittance threshold it changes no
rendered value (the compositing gives those samples zero weight anyway), so it is worth running
only while it removes more than it costs (otherwise fastnefes.render runs it always). On 2 CPU
cores a pre-pass sample costs about 0.3 of a fully evaluated one (in a training step and in a
render), and on the trained room, kitchen, fox and lego runs the pre-pass culled 0%, 2-4%, 11%
and 42% (lego's test views) of the samples: a net loss in three scenes of four.

A CullSchedule runs the pre-pass while the culled fraction it last measured is at least
CULL_COST, and otherwise skips it, probing again after PROBE_EVERY skipped renders (the field
and the occupancy grid change while training; the views change while refining).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Cost of a density-only pre-pass sample relative to a fully evaluated one (training: forward and
# backward through every head; rendering: forward through every head): the break-even culled fraction.
CULL_COST = 0.3
PROBE_EVERY = 16


@dataclass
class CullSchedule:
    """Decides, render by render, whether to run the culling pre-pass.

    break_even: run while the last measured culled fraction is at least this (0: always run).
    probe_every: with the pre-pass off, run it again after this many renders to re-measure.
    """

    break_even: float = CULL_COST
    probe_every: int = PROBE_EVERY
    culled_fraction: float = 1.0  # last measurement; the first render measures
    skipped: int = 0

    def due(self) -> bool:
        """Whether this render runs the pre-pass (counts the skips)."""
        if self.culled_fraction >= self.break_even or self.skipped >= self.probe_every:
            return True
        self.skipped += 1
        return False

    def record(self, candidates: int, kept: int) -> None:
        """A pre-pass ran over `candidates` samples and kept `kept`."""
        if candidates > 0:
            self.culled_fraction = 1.0 - kept / candidates
            self.skipped = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, type(getattr(self, key))(value))
