"""The live resource source's arithmetic, on a stand-in for psutil (fixed counters)."""

import collections
import types

import pytest

from research.edge import resources

# Linux's field order (psutil.cpu_times); guest and guest_nice are also counted in user and nice.
CpuTimes = collections.namedtuple(
    "CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")
OwnTimes = collections.namedtuple("OwnTimes", "user system children_user children_system")


def _fake_psutil(machine, own, cores=2):
  machine, own = iter(machine), iter(own)
  process = types.SimpleNamespace(cpu_times=lambda: next(own))
  return types.SimpleNamespace(
      Process=lambda: process, cpu_count=lambda: cores, cpu_times=lambda: next(machine),
      virtual_memory=lambda: types.SimpleNamespace(available=512 * resources.MB),
      sensors_battery=lambda: None)


def _clock(*times):
  times = iter(times)
  return lambda: next(times)


def test_busy_seconds_leave_out_idle_iowait_and_guest_time():
  busy = resources._busy_seconds  # pylint: disable=protected-access
  times = CpuTimes(user=10.0, nice=2.0, system=3.0, idle=50.0, iowait=4.0, irq=0.5,
                   softirq=0.25, steal=0.125, guest=6.0, guest_nice=1.0)
  assert busy(times) == pytest.approx(10 + 2 + 3 + 0.5 + 0.25 + 0.125)
  # A platform without the Linux-only fields: all but idle.
  other = collections.namedtuple("Other", "user system idle")(1.0, 2.0, 7.0)
  assert busy(other) == pytest.approx(3.0)


def test_background_cpu_is_busy_time_less_own_time_over_wall_time_and_cores():
  start = CpuTimes(100.0, 0.0, 20.0, 500.0, 0.0, 0.0, 0.0, 0.0, 40.0, 0.0)
  # One second on 2 cores: user +1.0 of which a guest +0.5 (already in user), system +0.2,
  # idle +0.8; this process used 0.4 of it, so others kept (1.2 - 0.4) / 2 = 40 % busy.
  later = start._replace(user=101.0, system=20.2, idle=500.8, guest=40.5)
  source = resources.PsutilSource(
      clock=_clock(10.0, 11.0),
      psutil_module=_fake_psutil([start, later], [OwnTimes(5.0, 1.0, 0, 0),
                                                  OwnTimes(5.3, 1.1, 0, 0)]))
  reading = source.read(slowdown=1.5)
  assert reading.cpu_background == pytest.approx(0.4)
  assert reading.memory_available_mb == pytest.approx(512.0)
  assert reading.battery_percent is None and reading.slowdown == 1.5
