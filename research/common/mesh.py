"""The one mesh builder, and the CPU device count that multi-device work on CPU relies on.

On CPU, jax exposes several devices only when
`XLA_FLAGS=--xla_force_host_platform_device_count=N` is set before the backend starts (tests set
it in conftest.py, the launcher from `--cpu-devices`). `set_cpu_device_count` edits the flag;
`make_mesh` checks the requested shape against the devices actually present.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping, MutableMapping, Sequence

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_DEVICE_COUNT_RE = re.compile(re.escape(_DEVICE_COUNT_FLAG) + r"=(\S*)")


def cpu_device_count(env: Mapping[str, str] = os.environ) -> int:
  """The CPU device count that `XLA_FLAGS` asks for (1 when the flag is absent)."""
  match = _DEVICE_COUNT_RE.search(env.get("XLA_FLAGS", ""))
  if match is None:
    return 1
  try:
    count = int(match.group(1))
  except ValueError:
    raise ValueError(f"XLA_FLAGS {_DEVICE_COUNT_FLAG}={match.group(1)!r}: expected a positive "
                     "integer") from None
  if count < 1:
    raise ValueError(f"XLA_FLAGS {_DEVICE_COUNT_FLAG}={count}: expected a positive integer")
  return count


def set_cpu_device_count(count: int, env: MutableMapping[str, str] = os.environ) -> None:
  """Sets the CPU device count in `XLA_FLAGS`, keeping other flags.

  Takes effect only if the jax backend has not started yet in this process (call it before the
  first jax computation, or pass `env` for a child process).
  """
  if not isinstance(count, int) or count < 1:
    raise ValueError(f"cpu device count: got {count!r}, expected a positive int")
  flags = _DEVICE_COUNT_RE.sub("", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={count}"])


def make_mesh(axis_shapes: Sequence[int], axis_names: Sequence[str], *, devices=None,
              explicit: bool = False):
  """Builds a `jax.sharding.Mesh` over all (global) devices, or over `devices` if given.

  Axes are `AxisType.Auto` by default, so `with_sharding_constraint` and XLA's propagation work as
  in classic jit code; `explicit=True` gives explicit-sharding axes (jax >= 0.9 default).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType  # pylint: disable=import-outside-toplevel

  axis_shapes, axis_names = tuple(axis_shapes), tuple(axis_names)
  if len(axis_shapes) != len(axis_names):
    raise ValueError(f"mesh axis_shapes={axis_shapes} and axis_names={axis_names} differ in "
                     "length")
  if len(set(axis_names)) != len(axis_names):
    raise ValueError(f"mesh axis_names={axis_names} repeat a name")
  if any(not isinstance(s, int) or s < 1 for s in axis_shapes):
    raise ValueError(f"mesh axis_shapes={axis_shapes}: expected positive ints")
  devices = list(jax.devices() if devices is None else devices)
  if math.prod(axis_shapes) != len(devices):
    raise ValueError(
        f"mesh axis_shapes={axis_shapes} needs {math.prod(axis_shapes)} devices, but "
        f"{len(devices)} are available ({devices[0].platform}); on CPU set "
        f"XLA_FLAGS={_DEVICE_COUNT_FLAG}=N before importing jax")
  axis_type = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(axis_shapes, axis_names, axis_types=(axis_type,) * len(axis_names),
                       devices=devices)
