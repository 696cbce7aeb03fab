"""Clocks of the device loop (pure Python).

The loop reads time in exactly three places: at the start of an iteration (`now`), at the
end of a step (`step_done`), and when it has nothing to run before the next arrival
(`idle_until`). A wall clock serves the engine, a virtual clock the simulator; a recording
of a wall clock's readings, replayed, makes the simulator see the engine's exact timeline
(`experiments.validate_sim --replay`).
"""

from __future__ import annotations

import time
from typing import List, Protocol, Tuple


class Clock(Protocol):
    def reset(self) -> None: ...

    def now(self) -> float: ...

    def step_done(self, seconds: float) -> float: ...

    def idle_until(self, t: float) -> None: ...


class WallClock:
    """Seconds since `reset()` on the host's monotonic clock. Idling sleeps, in slices of at
    most `max_sleep_s` so that a caller polling for work wakes up regularly."""

    def __init__(self, max_sleep_s: float = 0.05):
        self.max_sleep_s = max_sleep_s
        self._t0 = time.perf_counter()

    def reset(self) -> None:
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def step_done(self, seconds: float) -> float:
        return self.now()  # the step really took its time

    def idle_until(self, t: float) -> None:
        wait = t - self.now()
        if wait > 0:
            time.sleep(min(wait, self.max_sleep_s))


class VirtualClock:
    """Simulated seconds: a step advances time by its duration, idling jumps to the time."""

    def __init__(self):
        self.t = 0.0

    def reset(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def step_done(self, seconds: float) -> float:
        self.t += seconds
        return self.t

    def idle_until(self, t: float) -> None:
        if t > self.t:
            self.t = t


Reading = Tuple[str, float]  # ("now" | "step_done" | "idle_until", the time after the call)


class RecordingClock:
    """Wraps a clock and records every reading, so a replay can reproduce the timeline."""

    def __init__(self, inner: Clock):
        self.inner = inner
        self.readings: List[Reading] = []

    def reset(self) -> None:
        self.inner.reset()
        self.readings.append(("reset", 0.0))

    def now(self) -> float:
        t = self.inner.now()
        self.readings.append(("now", t))
        return t

    def step_done(self, seconds: float) -> float:
        t = self.inner.step_done(seconds)
        self.readings.append(("step_done", t))
        return t

    def idle_until(self, t: float) -> None:
        self.inner.idle_until(t)
        self.readings.append(("idle_until", self.inner.now()))


class ReplayDiverged(RuntimeError):
    """The replayed loop asked for time in a different order than the recorded one: its
    decisions differed from the recorded run's."""


class ReplayClock:
    """Plays back a `RecordingClock`'s readings, in order, checking that the loop asks for
    the same kind of reading at each point."""

    def __init__(self, readings: List[Reading]):
        self.readings = list(readings)
        self.i = 0
        self.t = 0.0

    def _next(self, kind: str) -> float:
        if self.i >= len(self.readings):
            raise ReplayDiverged(f"the replay asked for {kind!r} after the recording ended "
                                 f"({len(self.readings)} readings)")
        got, t = self.readings[self.i]
        if got != kind:
            raise ReplayDiverged(f"reading {self.i}: the replay asked for {kind!r}, the "
                                 f"recording has {got!r}")
        self.i += 1
        self.t = t
        return t

    def reset(self) -> None:
        self._next("reset")

    def now(self) -> float:
        return self._next("now")

    def step_done(self, seconds: float) -> float:
        return self._next("step_done")

    def idle_until(self, t: float) -> None:
        self._next("idle_until")
