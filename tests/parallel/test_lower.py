"""research/parallel/lower.py: the executor moves arrays exactly, with the collectives planned."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from research.common.mesh import make_mesh
from research.parallel import lower
from research.parallel import plan as plan_lib
from research.parallel.layout import Layout, LayoutError, all_layouts, random_layout

MESHES = [((8,), ("a",)), ((2, 4), ("x", "y")), ((4, 2), ("x", "y")), ((2, 2, 2), ("x", "y", "z"))]
SHAPES = [(16,), (8, 24), (16, 8, 4), (4, 8, 8)]
DTYPES = ["float32", "int32", "bfloat16"]


def check_move(mesh, shape, dtype, source, target):
  plan = plan_lib.plan_redistribution(shape, dtype, source, target)
  array = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape).astype(dtype)
  placed = jax.device_put(array, source.sharding(mesh))
  fn = lower.redistribute_fn(plan, mesh)
  out = fn(placed)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(array))
  assert out.dtype == array.dtype
  assert out.sharding.is_equivalent_to(target.sharding(mesh), len(shape)), plan.summary()
  for shard in out.addressable_shards:  # every device holds exactly its target block
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(array)[shard.index])
  found = lower.hlo_collectives(lower.compiled_text(fn, placed), mesh.size)
  assert collections.Counter(kind for kind, _ in found) == plan.collectives(), plan.summary()
  # XLA's CPU backend runs bf16 collectives in f32 (a convert on each side): twice the bytes.
  widen = 2 if dtype == "bfloat16" and jax.default_backend() == "cpu" else 1
  assert sum(b for _, b in found) == pytest.approx(widen * plan.predicted_bytes), plan.summary()
  bound = plan_lib.lower_bound_bytes(shape, dtype, source, target, mesh)
  assert plan.predicted_bytes >= bound - 1e-9
  return plan


@pytest.mark.parametrize("mesh_index", range(4))
@pytest.mark.parametrize("cases", [pytest.param(3, id="3cases"),
                                   pytest.param(12, id="12cases", marks=pytest.mark.slow)])
def test_random_moves_are_exact_and_match_the_plan(mesh_index, cases):
  mesh = make_mesh(*MESHES[mesh_index])
  rng = np.random.default_rng(100 + mesh_index)  # the 3-case draw is the 12-case draw's start
  kinds = collections.Counter()
  for case in range(cases):
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    layouts = all_layouts(mesh, shape)
    source, target = (layouts[i] for i in rng.integers(len(layouts), size=2))
    plan = check_move(mesh, shape, DTYPES[case % len(DTYPES)], source, target)
    kinds.update(plan.collectives())
  assert sum(kinds.values()) > 0  # the draw exercised some collectives


@pytest.mark.parametrize("shape, names", [((4,), ("a",)), ((8,), ("a",)), ((2, 4), ("x", "y"))])
def test_moves_on_explicit_axis_meshes_including_composite_sub_axes(shape, names):
  """jax.make_mesh's default axes are Explicit: the sharding is in the array's type and
  shard_map checks it, including when the plan splits an axis of size 4 or 8 into sub-axes."""
  mesh = make_mesh(shape, names, explicit=True, devices=jax.devices()[:int(np.prod(shape))])
  first = names[0]
  check_move(mesh, (16, 8), "float32", Layout.from_spec(mesh, P(first, None), 2),
             Layout.from_spec(mesh, P(None, None), 2))  # the case that failed: sub-axes of 'a'
  rng = np.random.default_rng(7)
  for case in range(3):
    layouts = all_layouts(mesh, (16, 8, 4))
    source, target = (layouts[i] for i in rng.integers(len(layouts), size=2))
    check_move(mesh, (16, 8, 4), DTYPES[case], source, target)


def test_known_case_no_all_gather_in_hlo():
  mesh = make_mesh((4, 2), ("x", "y"))
  source = Layout.from_spec(mesh, P("y", None, "x"), 3)
  target = Layout.from_spec(mesh, P(None, ("x", "y"), None), 3)
  plan = check_move(mesh, (16, 16, 16), "float32", source, target)
  assert plan.collectives() == {"all-to-all": 2}
  xla = lower.compiled_text(lower.xla_reshard_fn(target, mesh),
                            jax.device_put(jnp.zeros((16, 16, 16)), source.sharding(mesh)))
  xla_bytes = sum(b for _, b in lower.hlo_collectives(xla, 8))
  assert lower.replicates(xla, 16 ** 3 * 4)  # XLA gathers the whole tensor here
  assert plan.predicted_bytes < xla_bytes


def test_every_operator_kind_runs():
  mesh = make_mesh((2, 2, 2), ("x", "y", "z"))
  cases = [(P("x"), P("y")),                       # collective permute
           (P(("x", "y")), P(("y", "x"))),           # permute of the axis order
           (P("x", "y"), P(None, ("y", "x"))),       # all-to-all + ...
           (P(("x", "y", "z")), P()),                # all-gathers
           (P(), P("z", ("x", "y")))]                # slices only
  for source, target in cases:
    check_move(mesh, (8, 8), "float32", Layout.from_spec(mesh, source, 2),
               Layout.from_spec(mesh, target, 2))


def test_partial_sums_inside_a_shard_map_body():
  mesh = make_mesh((2, 4), ("d", "m"))
  partial = Layout(mesh, (("d",), ()), partial=("m",))
  target = Layout(mesh, (("d",), ("m",)))
  # Inside a shard_map over `mesh` the plan must name its axes, not refined sub-axes.
  plan = plan_lib.plan_redistribution((8, 16), "float32", partial, target, refine=False)
  parts = jax.random.normal(jax.random.key(0), (4, 8, 16))  # one addend per m
  body = jax.shard_map(lambda p: lower.local_fn(plan)(p[0]), mesh=mesh,
                       in_specs=P("m", "d", None), out_specs=target.to_spec(), check_vma=False)
  np.testing.assert_allclose(jax.jit(body)(parts), parts.sum(0), rtol=1e-6)
  with pytest.raises(LayoutError, match="partial-sum layout exists only inside a shard_map"):
    lower.redistribute_fn(plan, mesh)


def test_redistribute_reads_the_source_layout():
  mesh = make_mesh((2, 4), ("x", "y"))
  array = jax.device_put(jnp.arange(64.0).reshape(8, 8),
                         Layout.from_spec(mesh, P("x", "y"), 2).sharding(mesh))
  target = Layout.from_spec(mesh, P("y", "x"), 2)
  out = lower.redistribute(array, target, mesh)
  np.testing.assert_array_equal(out, np.arange(64.0).reshape(8, 8))
  assert lower.layout_of(out, mesh) == target


def test_hlo_reader_formats():
  text = """
  %a = f32[8,16]{1,0} all-gather(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={1}
  %b = (f32[4,2]{1,0}, f32[4,2]{1,0}) all-to-all(%s, %t), channel_id=2, replica_groups=[4,2]<=[8]
  %c = f32[2]{0} reduce-scatter(%q), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %g = (f32[4]{0}, f32[4]{0}) all-to-all(%w, %z), replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1':(2)2}
  %d = bf16[10]{0} all-reduce(%r), replica_groups={}
  %e = f32[6]{0} collective-permute(%u), source_target_pairs={{0,1},{1,0}}
  %f = f32[6]{0} collective-permute(%v), source_target_pairs={{0,0},{1,1}}
  %h = (f32[4,6]{1,0}, f32[4,6]{1,0}, u32[], u32[]) collective-permute-start(%p), source_target_pairs={{0,1},{1,0}}
  %i = (f32[2,6]{1,0}, f32[8,6]{1,0}) all-gather-start(%p), replica_groups={{0,1,2,3}}, dimensions={0}
  %j = f32[8,6]{1,0} all-gather-done(%i)
  """
  assert lower.hlo_collectives(text, 8) == [
      ("all-gather", 512 * 3 / 4), ("all-to-all", 64 / 2), ("reduce-scatter", 8.0 * 3),
      ("all-to-all", 32 / 2), ("all-reduce", 2 * 20 * 7 / 8), ("collective-permute", 24.0), ("collective-permute", 0.0),
      ("collective-permute", 96.0), ("all-gather", 192 * 3 / 4)]
  assert lower.replicates(text, 512) and not lower.replicates(text, 513)  # %a is the largest


def _collectives(fn, *args, devices=8):
  return collections.Counter(k for k, _ in lower.hlo_collectives(lower.compiled_text(fn, *args),
                                                                 devices))


def test_reshard_inside_jit_and_under_grad_runs_the_planned_collectives():
  mesh = make_mesh((2, 4), ("x", "y"), explicit=True)
  source, target = P("x", "y"), P("y", None)
  value = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
  x = jax.device_put(value, jax.sharding.NamedSharding(mesh, source))
  weight = jax.device_put(value[::-1] / 7, jax.sharding.NamedSharding(mesh, target))
  forward = plan_lib.plan_redistribution(value.shape, value.dtype, Layout.from_spec(
      mesh, source, 2), Layout.from_spec(mesh, target, 2))
  backward = plan_lib.plan_redistribution(value.shape, value.dtype, Layout.from_spec(
      mesh, target, 2), Layout.from_spec(mesh, source, 2))
  assert forward.collectives() and backward.collectives()

  moved = jax.jit(lambda a: lower.reshard(a, target) * 2.0)  # the layout read from a's type
  out = moved(x)
  np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(value))
  assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, target), 2)
  assert _collectives(moved, x) == forward.collectives()

  grad = jax.jit(jax.grad(lambda a, w: jnp.sum(lower.reshard(a, target) * w)))
  g = grad(x, weight)  # d/da sum(move(a) * w) = w moved back: the reverse plan
  np.testing.assert_array_equal(np.asarray(g), np.asarray(weight))
  assert g.sharding.is_equivalent_to(x.sharding, 2)
  assert _collectives(grad, x, weight) == backward.collectives()


def test_reshard_on_an_auto_mesh_takes_the_source_layout_inside_jit():
  mesh = make_mesh((2, 4), ("x", "y"))
  value = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
  x = jax.device_put(value, jax.sharding.NamedSharding(mesh, P(None, ("x", "y"))))
  out = jax.jit(lambda a: lower.reshard(a, P("y", "x"), mesh, source=P(None, ("x", "y"))))(x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(value))
  assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("y", "x")), 2)
  np.testing.assert_array_equal(np.asarray(lower.reshard(x, P("x", None))), np.asarray(value))
  with pytest.raises(LayoutError, match="pass source="):
    jax.jit(lambda a: lower.reshard(a, P("y", "x"), mesh))(x)
  with pytest.raises(LayoutError, match="'z'"):
    lower.reshard(x, P("z", None))
  odd = jax.device_put(jnp.zeros((6, 16)), jax.sharding.NamedSharding(mesh, P(None, "y")))
  with pytest.raises(LayoutError, match=r"dimension 0 of shape \(6, 16\) has size 6, not "
                                        r"divisible by mesh axes \('y',\)"):
    lower.reshard(odd, P("y", None))
  other = make_mesh((4, 2), ("x", "y"))
  with pytest.raises(LayoutError, match="mesh"):
    lower.reshard(x, Layout.from_spec(other, P("x", None), 2))


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("shape, names", [((8,), ("a",)), ((2, 4), ("x", "y")),
                                          ((2, 2, 2), ("x", "y", "z"))])
def test_random_rank_4_moves_on_auto_and_explicit_meshes(shape, names, explicit):
  mesh = make_mesh(shape, names, explicit=explicit)
  rng = np.random.default_rng(400 + len(names) + 10 * explicit)
  for case in range(2):
    source, target = (random_layout(mesh, (8, 8, 4, 4), rng) for _ in range(2))
    check_move(mesh, (8, 8, 4, 4), DTYPES[case], source, target)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_fused_all_to_all_is_one_collective_with_xlas_bytes(explicit):
  mesh = make_mesh((2, 4), ("x", "y"), explicit=explicit)
  source = Layout.from_spec(mesh, P("x", "y", None, None), 4)
  target = Layout.from_spec(mesh, P(None, None, "x", "y"), 4)
  plan = check_move(mesh, (8, 8, 8, 8), "float32", source, target)
  assert [type(s.op) for s in plan.steps] == [plan_lib.FusedAllToAll]
  placed = jax.device_put(jnp.zeros((8, 8, 8, 8)), source.sharding(mesh))
  xla = lower.hlo_collectives(lower.compiled_text(lower.xla_reshard_fn(target, mesh), placed), 8)
  assert sum(b for _, b in xla) == plan.predicted_bytes  # XLA fuses the same way
  # Both axes moved on a rank-6 tensor: one all-to-all over the group of all eight devices.
  three = plan_lib.plan_redistribution(
      (4, 4, 4, 4, 4, 4), "float32", Layout(mesh, (("x",), ("y",), (), (), (), ())),
      Layout(mesh, ((), (), (), ("x",), ("y",), ())))
  assert three.collectives() == {"all-to-all": 1}


_SIXTEEN = """
import numpy as np
from jax.sharding import PartitionSpec as P
from research.common.mesh import make_mesh
from research.parallel.layout import Layout, random_layout
from tests.parallel.test_lower import check_move
rng = np.random.default_rng(16)
for shape, names in (((16,), ("a",)), ((2, 8), ("x", "y"))):
  for explicit in (False, True):
    mesh = make_mesh(shape, names, explicit=explicit)
    check_move(mesh, (32, 16), "float32", Layout.from_spec(mesh, P(names[-1], None), 2),
               Layout.from_spec(mesh, P(None, names[-1]), 2))
    for _ in range(2):
      source, target = (random_layout(mesh, (16, 16, 4), rng) for _ in range(2))
      check_move(mesh, (16, 16, 4), "float32", source, target)
print("sixteen ok")
"""


def test_moves_on_meshes_with_an_axis_of_16_in_a_16_device_process():
  """The test process has 8 CPU devices; a child with 16 runs the same checks (values, target
  sharding, HLO collectives equal the plan) on an axis of 16 and on (2, 8), Auto and Explicit."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=16",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run([sys.executable, "-c", _SIXTEEN], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and "sixteen ok" in result.stdout, result.stderr[-3000:]
