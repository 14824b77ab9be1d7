"""research/parallel/layout.py: conversions, shard shapes, validation."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from research.common.mesh import make_mesh
from research.parallel.layout import Layout, LayoutError, all_layouts

MESH_AXES = (("x", 4), ("y", 2))


def test_partition_spec_round_trip_and_shard_shape():
  layout = Layout.from_spec(MESH_AXES, P("y", None, "x"), 3)
  assert layout.dims == (("y",), (), ("x",))
  assert layout.to_spec() == P("y", None, "x")
  assert layout.shard_shape((16, 16, 16)) == (8, 16, 4)
  both = Layout.from_spec(MESH_AXES, P(None, ("x", "y")), 3)
  assert both.dims == ((), ("x", "y"), ())
  assert both.to_spec() == P(None, ("x", "y"), None)
  assert both.shard_shape((16, 16, 16)) == (16, 2, 16)
  assert both.free_axes == () and layout.used_axes == ("x", "y")
  assert Layout.replicated(MESH_AXES, 2).free_axes == ("x", "y")


def test_mindspore_round_trip():
  # MindSpore: device matrix (4, 2); tensor map entry 1 names dim 0 of the device matrix (x).
  layout = Layout.from_mindspore((4, 2), (0, -1, 1), axis_names=("x", "y"))
  assert layout == Layout.from_spec(MESH_AXES, P("y", None, "x"), 3)
  assert layout.to_mindspore() == ((4, 2), (0, -1, 1))
  merged = Layout.from_mindspore((4, 2), (-1, (1, 0)), axis_names=("x", "y"))
  assert merged.dims == ((), ("x", "y"))
  assert merged.to_mindspore() == ((4, 2), (-1, (1, 0)))
  assert Layout.from_mindspore((2, 2), (1, 0)).dims == (("d0",), ("d1",))
  with pytest.raises(LayoutError, match="tensor_map entry 2"):
    Layout.from_mindspore((4, 2), (2, -1))


@pytest.mark.parametrize("spec,shape,match", [
    (P("x", None), (6, 4), r"dimension 0 of shape \(6, 4\) has size 6, not divisible by mesh "
                           r"axes \('x',\)"),
    (P(("x", "y")), (4, 4), r"not divisible by mesh axes \('x', 'y'\) \(product 8\)"),
    (P("x", None), (8, 4, 2), r"rank 2; the tensor has shape \(8, 4, 2\)"),
])
def test_shape_errors_name_the_dimension(spec, shape, match):
  with pytest.raises(LayoutError, match=match):
    Layout.from_spec(MESH_AXES, spec, 2).shard_shape(shape)


def test_axis_errors():
  with pytest.raises(LayoutError, match="unknown mesh axis 'z'"):
    Layout.from_spec(MESH_AXES, P("z"), 1)
  with pytest.raises(LayoutError, match=r"mesh axes \['x'\] are used more than once"):
    Layout.from_spec(MESH_AXES, P("x", "x"), 2)
  with pytest.raises(LayoutError, match="used more than once"):
    Layout(MESH_AXES, (("x",),), partial=("x",))
  with pytest.raises(LayoutError, match="4 entries for a rank-3 tensor"):
    Layout.from_spec(MESH_AXES, P(None, None, None, None), 3)
  with pytest.raises(LayoutError, match="a partial sum has no PartitionSpec"):
    Layout(MESH_AXES, ((),), partial=("y",)).to_spec()


def test_sharding_matches_jax_block_placement():
  mesh = make_mesh((2, 2, 2), ("x", "y", "z"))
  shape = (8, 8, 8)
  rng = np.random.default_rng(0)
  layouts = all_layouts(mesh, shape)
  assert len(layouts) == 106  # 3 labelled axes into 3 ordered lists or unused
  for i in rng.choice(len(layouts), 12, replace=False):
    layout = layouts[i]
    indices = layout.sharding(mesh).devices_indices_map(shape)
    block = layout.shard_shape(shape)
    for coords, device in np.ndenumerate(mesh.devices):
      coordinate = dict(zip(mesh.axis_names, coords))
      expected = tuple(slice(b * s, (b + 1) * s) for b, s in zip(layout.block_of(coordinate), block))
      got = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(indices[device], shape))
      assert got == expected, (layout, coordinate)


def test_sharding_refuses_another_mesh():
  mesh = make_mesh((8,), ("x",))
  with pytest.raises(LayoutError, match="used with mesh"):
    Layout.from_spec(MESH_AXES, P("x"), 1).sharding(mesh)
  assert jax.device_count() == 8
