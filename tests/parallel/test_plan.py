"""research/parallel/plan.py: plans are minimal under the model, respect the bound and the cap."""

import json

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from research.common.mesh import make_mesh
from research.parallel import plan as plan_lib
from research.parallel.layout import Layout, LayoutError, all_layouts, random_layout, refine

MESHES = [((8,), ("a",)), ((2, 4), ("x", "y")), ((4, 2), ("x", "y")), ((2, 2, 2), ("x", "y", "z"))]


def test_known_case_uses_two_all_to_alls():
  mesh_axes = (("x", 4), ("y", 2))
  source = Layout.from_spec(mesh_axes, P("y", None, "x"), 3)
  target = Layout.from_spec(mesh_axes, P(None, ("x", "y"), None), 3)
  plan = plan_lib.plan_redistribution((16, 16, 16), "float32", source, target)
  assert plan.collectives() == {"all-to-all": 2}
  local = 16 ** 3 * 4 // 8
  # Two all-to-alls move at most (n-1)/n of the local block each.
  assert plan.predicted_bytes <= local * (3 / 4 + 1 / 2)
  naive = plan_lib.gather_then_slice_plan((16, 16, 16), "float32", source, target)
  assert plan.predicted_bytes < naive.predicted_bytes


@pytest.mark.parametrize("mesh_index", range(4))
def test_plans_bound_and_never_worse_than_gather_then_slice(mesh_index):
  mesh = make_mesh(*MESHES[mesh_index])
  rng = np.random.default_rng(mesh_index)
  for shape in [(16, 8), (8, 16, 8), (16,)]:
    layouts = all_layouts(mesh, shape)
    for _ in range(15):
      source, target = (layouts[i] for i in rng.integers(len(layouts), size=2))
      plan = plan_lib.plan_redistribution(shape, "float32", source, target)
      bound = plan_lib.lower_bound_bytes(shape, "float32", source, target, mesh)
      naive = plan_lib.gather_then_slice_plan(shape, "float32", source, target)
      assert plan.predicted_bytes >= bound - 1e-9, plan.summary()
      assert plan.predicted_seconds <= naive.predicted_seconds + 1e-15, plan.summary()
      assert plan.steps[-1].after == refine(target) if plan.steps else source == target
      layout = refine(source)  # the steps chain from source to target (on the refined mesh)
      for step in plan.steps:
        assert step.before == layout and step.op.apply(layout) == step.after
        layout = step.after


def test_refined_mesh_moves_half_an_axis():
  # papers/parallel.md (design notes): on a (2, 4) mesh, P(None, 'y') -> P(None, 'x') of a
  # 64 x 64 float32 tensor under the bytes-only model is a permute and a gather over 'y:1'
  # (8 KiB per device), not a gather over 'y' and a slice (12 KiB).
  axes = (("x", 2), ("y", 4))
  source = Layout.from_spec(axes, P(None, "y"), 2)
  target = Layout.from_spec(axes, P(None, "x"), 2)
  bytes_only = plan_lib.CostModel(default_alpha=0.0, default_beta=1.0, launch=0.0)
  plan = plan_lib.plan_redistribution((64, 64), "float32", source, target, bytes_only)
  assert [type(s.op) for s in plan.steps] == [plan_lib.Permute, plan_lib.AllGather]
  assert plan.steps[1].op.axes == ("y:1",)
  assert plan.predicted_bytes == 8 * 1024
  naive = plan_lib.gather_then_slice_plan((64, 64), "float32", source, target, bytes_only)
  assert naive.predicted_bytes == 12 * 1024


def test_identity_and_single_steps():
  axes = (("x", 2), ("y", 4))
  a = Layout.from_spec(axes, P("x", "y"), 2)
  assert plan_lib.plan_redistribution((8, 8), "float32", a, a).steps == ()
  gather = plan_lib.plan_redistribution((8, 8), "float32", a, Layout.from_spec(axes, P("x"), 2))
  assert [s.op for s in gather.steps] == [plan_lib.AllGather(1, ("y:0", "y:1"))]
  assert gather.predicted_bytes == 3 * (4 * 2 * 4)  # receives 3 blocks of 4x2 float32
  sliced = plan_lib.plan_redistribution((8, 8), "float32", Layout.from_spec(axes, P("x"), 2), a)
  assert sliced.collectives() == {} and sliced.predicted_bytes == 0


def test_permute_for_equal_blocks_on_other_devices():
  axes = (("x", 2), ("y", 2), ("z", 2))
  source, target = Layout.from_spec(axes, P("x"), 1), Layout.from_spec(axes, P("y"), 1)
  plan = plan_lib.plan_redistribution((16,), "float32", source, target)
  assert plan.collectives() == {"collective-permute": 1}
  pairs = plan_lib.permute_pairs(source, target)
  assert sorted(d for _, d in pairs) == list(range(8)) and sorted(s for s, _ in pairs) == list(range(8))
  swapped = plan_lib.plan_redistribution(
      (16,), "float32", Layout.from_spec(axes, P(("x", "y")), 1),
      Layout.from_spec(axes, P(("y", "x")), 1))
  assert swapped.collectives() == {"collective-permute": 1}


def test_partial_sums_reduce_scatter_or_all_reduce():
  axes = (("d", 2), ("m", 4))
  partial = Layout(axes, (("d",), ()), partial=("m",))
  scattered = plan_lib.plan_redistribution((8, 16), "float32", partial,
                                           Layout(axes, (("d",), ("m",))))
  assert [s.op for s in scattered.steps] == [plan_lib.ReduceScatter(1, ("m:0", "m:1"))]
  reduced = plan_lib.plan_redistribution((8, 16), "float32", partial, Layout(axes, (("d",), ())))
  assert reduced.collectives() == {"all-reduce": 1}
  with pytest.raises(plan_lib.PlanError, match="cannot create partial sums"):
    plan_lib.plan_redistribution((8, 16), "float32", Layout(axes, (("d",), ())), partial)


def test_cost_model_changes_the_choice_and_cap_is_respected():
  axes = (("x", 2), ("y", 4))
  source = Layout.from_spec(axes, P("x", "y"), 2)
  target = Layout.from_spec(axes, P("y", "x"), 2)
  shape = (64, 64)
  plan = plan_lib.plan_redistribution(shape, "float32", source, target)
  assert all(s.peak_bytes <= plan.peak_bytes for s in plan.steps)
  # A cap below every gathered intermediate forbids all-gathers.
  local = 64 * 64 * 4 // 8
  capped = plan_lib.plan_redistribution(shape, "float32", source, target,
                                        max_bytes_per_device=2 * local)
  assert capped.peak_bytes <= 2 * local
  assert "all-gather" not in capped.collectives()
  with pytest.raises(plan_lib.PlanError, match="max_bytes_per_device=100"):
    plan_lib.plan_redistribution(shape, "float32", source, target, max_bytes_per_device=100)
  # An expensive axis is avoided when a path over the cheap one exists.
  slow_x = plan_lib.CostModel.per_axis(beta={"x": 1e-6})
  src = Layout.from_spec(axes, P(None, ("y", "x")), 2)
  dst = Layout.from_spec(axes, P(None, "y"), 2)
  assert plan_lib.plan_redistribution(shape, "float32", src, dst, slow_x).steps[0].op == \
      plan_lib.AllGather(1, ("x",))


# -- large meshes: the fast path -------------------------------------------------------------

LARGE = [(("a", 4), ("b", 4), ("c", 4), ("d", 4)),                         # 256 devices, 4 axes
         (("a", 2), ("b", 2), ("c", 2), ("d", 2), ("e", 4), ("f", 4)),     # 256 devices, 6 axes
         (("x", 16), ("y", 16))]                                           # 256 devices, 2 axes


@pytest.mark.parametrize("num_axes, rank", [(3, 1), (3, 2), (3, 3), (4, 2), (2, 4)])
def test_count_layouts_counts_every_layout(num_axes, rank):
  mesh_axes = tuple((f"m{i}", 2) for i in range(num_axes))
  assert plan_lib.count_layouts(num_axes, rank) == len(all_layouts(mesh_axes, (64,) * rank))


@pytest.mark.parametrize("mesh_index", range(4))
def test_auto_finds_dijkstras_optimum_on_small_meshes(mesh_index):
  """On 8-device meshes "auto" is exact (settled axes set aside, A* over every edge): the same
  (seconds, bytes, steps) as Dijkstra over the whole refined mesh, under both cost models."""
  mesh_axes = tuple(zip(MESHES[mesh_index][1], MESHES[mesh_index][0]))
  rng = np.random.default_rng(200 + mesh_index)
  bytes_only = plan_lib.CostModel(default_alpha=0.0, default_beta=1.0, launch=0.0)
  for _ in range(12):
    shape = [(16, 8), (8, 16, 8), (16,), (8, 8, 8, 8)][int(rng.integers(4))]
    source, target = (random_layout(mesh_axes, shape, rng) for _ in range(2))
    for model in (plan_lib.CostModel(), bytes_only):
      auto = plan_lib.plan_redistribution(shape, "float32", source, target, model)
      exact = plan_lib.plan_redistribution(shape, "float32", source, target, model,
                                           method="dijkstra")
      assert (auto.predicted_seconds, auto.predicted_bytes) == pytest.approx(
          (exact.predicted_seconds, exact.predicted_bytes), rel=1e-12), auto.summary()


@pytest.mark.parametrize("mesh_axes", LARGE, ids=["4x4x4x4", "2x2x2x2x4x4", "16x16"])
def test_large_mesh_plans_chain_to_the_target_within_the_bounds(mesh_axes):
  rng = np.random.default_rng(len(mesh_axes))
  for _ in range(10):
    shape = (256,) * int(rng.integers(1, 5))
    source, target = (random_layout(mesh_axes, shape, rng) for _ in range(2))
    plan = plan_lib.plan_redistribution(shape, "float32", source, target)
    layout = refine(source) if plan.steps and plan.steps[0].before != source else source
    for step in plan.steps:
      assert step.before == layout and step.op.apply(layout) == step.after
      layout = step.after
    # A non-empty plan ends at the target (on the refined mesh, or on the mesh itself when the
    # fast path planned there); it never ends back at the source: equal layouts plan no steps.
    assert layout in (refine(target), target) if plan.steps else source == target
    assert plan.predicted_bytes >= plan_lib.lower_bound_bytes(shape, "float32", source,
                                                              target) - 1e-9
    naive = plan_lib.gather_then_slice_plan(shape, "float32", source, target)
    assert plan.predicted_seconds <= naive.predicted_seconds * (1 + 1e-12), plan.summary()


def test_settled_axes_are_left_alone():
  mesh_axes = LARGE[0]
  source = Layout(mesh_axes, (("a", "b"), ("c",), ()))
  target = Layout(mesh_axes, (("a", "c"), (), ("b",)))
  plan = plan_lib.plan_redistribution((64, 64, 64), "float32", source, target)
  assert plan.steps and all(not a.startswith("a") for s in plan.steps for a in s.op.axes
                            if not isinstance(s.op, plan_lib.Permute)), plan.summary()
  assert all(s.after.dims[0][:1] in (("a",), ("a:0",)) for s in plan.steps), plan.summary()


@pytest.mark.parametrize("mesh_index", range(4))
def test_bound_without_a_mesh_equals_the_devices_indices_map(mesh_index):
  mesh = make_mesh(*MESHES[mesh_index])
  rng = np.random.default_rng(300 + mesh_index)
  for _ in range(10):
    shape = [(16, 8), (8, 16, 8), (16,)][int(rng.integers(3))]
    source, target = (random_layout(mesh, shape, rng) for _ in range(2))
    assert plan_lib.lower_bound_bytes(shape, "float32", source, target) == \
        plan_lib.lower_bound_bytes(shape, "float32", source, target, mesh)


def test_two_moves_fuse_into_one_all_to_all_at_the_bound():
  axes = (("x", 2), ("y", 4))
  source = Layout.from_spec(axes, P("x", "y", None, None), 4)
  target = Layout.from_spec(axes, P(None, None, "x", "y"), 4)
  for model in (plan_lib.CostModel(),
                plan_lib.CostModel(default_alpha=0.0, default_beta=1.0, launch=0.0)):
    plan = plan_lib.plan_redistribution((8, 8, 8, 8), "float32", source, target, model)
    assert [type(s.op) for s in plan.steps] == [plan_lib.FusedAllToAll], plan.summary()
    local = 8 ** 4 * 4 // 8
    assert plan.predicted_bytes == local * 7 / 8  # one group of 8: less than 1/2 + 3/4 apart
    assert plan.predicted_bytes == plan_lib.lower_bound_bytes((8, 8, 8, 8), "float32", source,
                                                              target)
  with pytest.raises(LayoutError, match="distinct source dims"):
    plan_lib.FusedAllToAll(((("x",), 0, 2), (("y",), 0, 3)))
  with pytest.raises(LayoutError, match="two or more moves"):
    plan_lib.FusedAllToAll(((("x",), 0, 2),))


def test_planner_rejects_an_unknown_method():
  axes = (("x", 2),)
  with pytest.raises(ValueError, match="method: got 'bfs'"):
    plan_lib.plan_redistribution((4,), "float32", Layout(axes, ((),)), Layout(axes, (("x",),)),
                                 method="bfs")


# -- a fitted cost model ---------------------------------------------------------------------


def _samples(params, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for kind, (launch, alpha, beta) in params.items():
    for hops in (1, 3, 7):
      for size in (4e3, 3e4, 2.6e5, 1e6):
        seconds = launch + alpha * hops + beta * size
        rows.append({"kind": kind, "hops": hops, "bytes": size,
                     "seconds": seconds * (1 + noise * rng.standard_normal())})
  return rows


def test_fit_recovers_the_parameters_and_the_model_costs_by_kind(tmp_path):
  params = {"all-gather": (2e-5, 3e-6, 1e-9), "collective-permute": (5e-5, 0.0, 4e-9),
            "all-to-all": (1e-5, 8e-6, 2e-9)}
  fit = plan_lib.fit_cost_model(_samples(params))
  for kind, (launch, alpha, beta) in params.items():
    got = fit["kinds"][kind]
    np.testing.assert_allclose([got["launch"], got["alpha"], got["beta"]], [launch, alpha, beta],
                               rtol=1e-6, atol=1e-12)
    assert got["median_relative_error"] < 1e-6
  model = plan_lib.CostModel.from_fit(fit)
  axes = (("x", 2), ("y", 4))
  layout = Layout.from_spec(axes, P(None, "y"), 2)
  gather = plan_lib.AllGather(1, ("y",))
  assert model.seconds(gather, layout, 1000.0) == pytest.approx(2e-5 + 3 * 3e-6 + 1e-6)
  # A kind the fit lacks costs the slowest fitted row's parameters.
  assert model.seconds(plan_lib.AllReduce(("x",)), Layout(axes, ((), ()), ("x",)), 0.0) == \
      pytest.approx(5e-5 + 8e-6)
  path = tmp_path / "kept.json"
  path.write_text(json.dumps({"summary": {"fit": fit}}))
  assert plan_lib.CostModel.load(path) == model
  with pytest.raises(ValueError, match="kind 'all-reduce' has 2 samples"):
    plan_lib.fit_cost_model(_samples(params) + [{"kind": "all-reduce", "hops": 1, "bytes": 1.0,
                                                 "seconds": 1e-5}] * 2)


def test_loading_a_file_without_a_fit_names_the_file_and_the_expected_keys(tmp_path):
  fit = plan_lib.fit_cost_model(_samples({"all-gather": (2e-5, 3e-6, 1e-9)}))
  (tmp_path / "fit.json").write_text(json.dumps(fit))  # the fit alone loads too
  assert plan_lib.CostModel.load(tmp_path / "fit.json") == plan_lib.CostModel.from_fit(fit)
  cases = {
      "no_fit.json": ({"summary": {"machine": {}}}, r"holds 'fit'.*found \['machine'\]"),
      "list.json": ([1, 2], "holds 'fit'.*found list"),
      "no_kinds.json": ({"summary": {"fit": {"dispatch_seconds": 1.0}}}, "holds 'fit'"),
      "empty.json": ({"fit": {"kinds": {}}}, "fit: expected 'kinds'"),
      "no_beta.json": ({"kinds": {"all-gather": {"launch": 1.0, "alpha": 0.0}}},
                       r"kind 'all-gather' lacks \['beta'\]"),
  }
  for name, (content, match) in cases.items():
    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"{name}: .*{match}"):
      plan_lib.CostModel.load(tmp_path / name)
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(ValueError, match="broken.json: not valid JSON"):
    plan_lib.CostModel.load(tmp_path / "broken.json")


def test_a_fitted_model_changes_the_plan_where_permutes_are_slow():
  # P(None, 'y') -> P(None, 'x') on (2, 4): a permute and a half-axis gather under the bytes
  # model (test_refined_mesh_moves_half_an_axis); with permutes 100x slower per byte, a gather
  # over 'y' and a slice.
  axes = (("x", 2), ("y", 4))
  source, target = Layout.from_spec(axes, P(None, "y"), 2), Layout.from_spec(axes, P(None, "x"), 2)
  slow_permute = plan_lib.CostModel.from_fit(plan_lib.fit_cost_model(_samples(
      {"all-gather": (0.0, 0.0, 1e-9), "collective-permute": (0.0, 0.0, 1e-7)})))
  plan = plan_lib.plan_redistribution((64, 64), "float32", source, target, slow_permute)
  assert plan.collectives() == {"all-gather": 1}, plan.summary()
  even = plan_lib.CostModel.from_fit(plan_lib.fit_cost_model(_samples(
      {"all-gather": (0.0, 0.0, 1e-9), "collective-permute": (0.0, 0.0, 1e-9)})))
  plan = plan_lib.plan_redistribution((64, 64), "float32", source, target, even)
  assert plan.collectives() == {"collective-permute": 1, "all-gather": 1}, plan.summary()
