"""Where the device's resource data comes from: psutil on the live machine, or an injected
sequence (tests, recorded traces). Both are a `ResourceSource`: `read(slowdown) -> Resources`.

The live source reads what an edge runtime can read cheaply between two frames:
- background CPU: the busy CPU time of the whole machine minus this process's own CPU time
  since the previous reading, over the wall time and the cores (psutil.cpu_times and
  Process.cpu_times), so the pipeline's own work does not count as load;
- free memory: psutil.virtual_memory().available;
- battery: psutil.sensors_battery() where the machine has one (None otherwise, as here).
The `slowdown` (measured over predicted latency of recent frames) is the runtime's own feedback;
the source only stamps it onto the reading.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Protocol, Sequence

from research.edge.selector import Resources

MB = 1024 * 1024


class ResourceSource(Protocol):
  def read(self, slowdown: float = 1.0) -> Resources: ...


def _busy_seconds(times) -> float:
  """Busy CPU seconds over all cores: everything but idle and iowait, and without guest and
  guest_nice, which Linux already counts in user and nice (psutil's own cpu_percent leaves
  them out the same way); fields a platform lacks count 0."""
  idle = getattr(times, "idle", 0.0) + getattr(times, "iowait", 0.0)
  guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
  return sum(times) - idle - guest


class PsutilSource:
  """The live machine's resources (module docstring); the first reading covers the time since
  the source was made."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter, psutil_module=None):
    """`psutil_module`: the psutil module (the default) or a stand-in with the same calls."""
    if psutil_module is None:
      import psutil as psutil_module  # pylint: disable=import-outside-toplevel
    self._psutil = psutil_module
    self._process = psutil_module.Process()
    self._clock = clock
    self._cores = psutil_module.cpu_count() or 1
    self._last = self._sample()

  def _sample(self):
    own = self._process.cpu_times()
    # Only this process's own user + system time is subtracted: its children (an experiment's
    # load generators among them) are load like any other process.
    return (self._clock(), _busy_seconds(self._psutil.cpu_times()), own.user + own.system)

  def read(self, slowdown: float = 1.0) -> Resources:
    now = self._sample()
    wall = max(now[0] - self._last[0], 1e-6)
    background = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / (wall * self._cores)
    self._last = now
    battery = self._psutil.sensors_battery()
    return Resources(cpu_background=min(max(background, 0.0), 1.0),
                     memory_available_mb=self._psutil.virtual_memory().available / MB,
                     battery_percent=None if battery is None else float(battery.percent),
                     slowdown=float(slowdown))


class SequenceSource:
  """Readings from a given sequence, one per call (tests and recorded traces); the last one
  repeats once the sequence is used up. The slowdown passed in replaces the recorded one unless
  `keep_slowdown`."""

  def __init__(self, readings: Iterable[Resources], keep_slowdown: bool = False):
    self._readings: Sequence[Resources] = tuple(readings)
    if not self._readings:
      raise ValueError("SequenceSource: expected at least one Resources reading")
    self._next = 0
    self._keep = keep_slowdown

  def read(self, slowdown: float = 1.0) -> Resources:
    reading = self._readings[min(self._next, len(self._readings) - 1)]
    self._next += 1
    return reading if self._keep else reading._replace(slowdown=float(slowdown))


def from_records(records: Iterable[dict]) -> list[Resources]:
  """Resources from recorded metadata (the `resources` object of each output's metadata)."""
  out = []
  for i, record in enumerate(records):
    try:
      out.append(Resources(float(record["cpu_background"]), float(record["memory_available_mb"]),
                           None if record.get("battery_percent") is None
                           else float(record["battery_percent"]),
                           float(record.get("slowdown", 1.0))))
    except (KeyError, TypeError, ValueError) as error:
      raise ValueError(f"recorded resources #{i}: {error!r}; expected an object with "
                       "cpu_background, memory_available_mb, battery_percent, slowdown") from None
  return out
