import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from research.common import mesh as mesh_lib


def test_cpu_device_count_reads_and_sets_the_flag():
  assert mesh_lib.cpu_device_count({}) == 1
  env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=3"}
  assert mesh_lib.cpu_device_count(env) == 3
  mesh_lib.set_cpu_device_count(8, env)
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
  assert mesh_lib.cpu_device_count(env) == 8
  with pytest.raises(ValueError, match="expected a positive integer"):
    mesh_lib.cpu_device_count({"XLA_FLAGS": "--xla_force_host_platform_device_count=two"})
  with pytest.raises(ValueError, match="positive int"):
    mesh_lib.set_cpu_device_count(0, {})


def test_conftest_gives_eight_cpu_devices():
  assert jax.device_count() == mesh_lib.cpu_device_count() == 8


def test_make_mesh_shapes_axes_and_shards():
  mesh = mesh_lib.make_mesh((4, 2), ("data", "model"))
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  x = jax.device_put(np.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "model")))
  assert {s.data.shape for s in x.addressable_shards} == {(2, 4)}
  np.testing.assert_array_equal(np.asarray(x), np.arange(64.0).reshape(8, 8))
  assert mesh_lib.make_mesh((8,), ("data",), explicit=True).axis_types == (AxisType.Explicit,)


@pytest.mark.parametrize("shapes, names, match", [
    ((3, 2), ("a", "b"), r"needs 6 devices, but 8 are available"),
    ((8,), ("a", "b"), "differ in length"),
    ((4, 2), ("a", "a"), "repeat a name"),
    ((8, 0), ("a", "b"), "positive ints"),
])
def test_make_mesh_refuses_shapes_that_do_not_fit(shapes, names, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.make_mesh(shapes, names)
