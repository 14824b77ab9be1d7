"""research/kquant: buckets, compressors, coordinator policies."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.kquant import buckets, coordinator, quantize

PARAMS = {"w": jnp.zeros((30, 20)), "b": jnp.zeros((20,)), "v": jnp.zeros((3,))}


def layout(bucket_size=64):
  return buckets.bucket_layout(PARAMS, bucket_size)


def test_buckets_round_trip_and_never_span_tensors():
  lay = layout()
  assert lay.rows == (1, 1, 10) or sorted(lay.rows) == [1, 1, 10]  # b, v: 1 row; w: 600 -> 10
  tree = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape), PARAMS)
  rows = buckets.to_buckets(tree, lay)
  assert rows.shape == (12, 64)
  np.testing.assert_array_equal(rows[~buckets.valid_mask(lay)], 0.0)  # padding is zero
  back = buckets.from_buckets(rows, lay)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  assert lay.num_params == 623
  with pytest.raises(ValueError, match="bucket_size=12"):
    buckets.bucket_layout(PARAMS, 12)
  with pytest.raises(ValueError, match=r"buckets: got shape \(11, 64\)"):
    buckets.from_buckets(rows[:11], lay)


def test_kquant_aggregate_is_the_weighted_sum_of_decodes():
  lay = layout()
  compressor = quantize.kquant(lay, k=16, impl="pallas")
  spec = coordinator.fixed_range(lay, 1.0)
  updates = jax.random.normal(jax.random.key(0), (3, 12, 64)) * 0.5
  messages = jax.vmap(compressor.encode, (0, None, 0))(updates, spec,
                                                       jax.random.split(jax.random.key(1), 3))
  assert messages.shape == (3, 12, 32) and messages.dtype == jnp.uint8  # 4 bits: 2 per byte
  weights = jnp.array([0.5, 0.3, 0.2])
  aggregate = compressor.aggregate(messages, weights, spec)
  decoded = jax.vmap(compressor.decode, (0, None))(messages, spec)
  np.testing.assert_allclose(aggregate, jnp.tensordot(weights, decoded, axes=1), atol=1e-6)
  # Each decode is within one bin of the (clipped) input.
  step = 2.0 / 15
  assert float(jnp.max(jnp.abs(decoded - jnp.clip(updates, -1, 1)))) <= step * (1 + 1e-5)
  assert compressor.uplink_bits == 12 * 64 * 4


@pytest.mark.parametrize("k, match", [(1, "K=1: expected an int >= 2"),
                                      (300, "K=300 needs more than bits=8")])
def test_kquant_refuses_bad_k(k, match):
  with pytest.raises(ValueError, match=match):
    quantize.kquant(layout(), k=k, bits=8)


def test_messages_with_the_wrong_length_or_bit_width_are_refused():
  lay = layout()
  compressor = quantize.kquant(lay, k=16)
  spec = coordinator.fixed_range(lay, 1.0)
  with pytest.raises(ValueError, match=r"client message: got uint8\[12, 16\], expected "
                     r"uint8\[12, 32\].*wrong length or bit width"):
    compressor.aggregate(jnp.zeros((2, 12, 16), jnp.uint8), jnp.ones(2) / 2, spec)  # 2-bit
  with pytest.raises(ValueError, match="client message"):
    compressor.decode(jnp.zeros((11, 32), jnp.uint8), spec)  # a bucket short
  with pytest.raises(ValueError, match="client message"):
    compressor.decode(jnp.zeros((12, 32), jnp.int32), spec)


@pytest.mark.parametrize("lo, hi, match", [([0.0, 1.0], [1.0, 1.0], "bucket 1: lo=1.0, hi=1.0"),
                                           ([0.0], [-1.0], "bucket 0"),
                                           ([np.nan], [1.0], "bucket 0: lo=nan")])
def test_check_range_refuses_empty_or_non_finite_ranges(lo, hi, match):
  with pytest.raises(ValueError, match=match):
    quantize.check_range(lo, hi)
  quantize.check_range([0.0], [1e-6])
  # A client refuses a concrete range message that is empty.
  lay = layout()
  spec = quantize.RangeSpec(jnp.zeros(12), jnp.zeros(12).at[3].set(1.0))
  with pytest.raises(ValueError, match="bucket 0: lo=0.0, hi=0.0"):
    quantize.kquant(lay, k=4).encode(jnp.zeros((12, 64)), spec, jax.random.key(0))


@pytest.mark.parametrize("name", ["qsgd", "terngrad"])
def test_stochastic_baselines_are_unbiased(name):
  lay = layout()
  compressor = quantize.by_name(name, lay, qsgd_levels=2)
  v = jax.random.normal(jax.random.key(2), (12, 64))
  draws = 3000
  decoded = jax.jit(jax.vmap(lambda key: compressor.decode(compressor.encode(v, None, key), None))
                    )(jax.random.split(jax.random.key(3), draws))
  error = np.asarray(decoded.mean(0) - v)
  spread = np.asarray(decoded.std(0)) / np.sqrt(draws)
  assert np.all(np.abs(error) <= 6 * spread + 1e-6)


def test_sign_majority_votes():
  lay = layout()
  compressor = quantize.sign_majority(lay)
  ones = jnp.ones((12, 64))
  messages = jax.vmap(compressor.encode, (0, None, None))(
      jnp.stack([ones, ones, -3 * ones]), None, None)
  aggregate = compressor.aggregate(messages, jnp.array([0.4, 0.4, 0.2]), None)
  # Majority sign (+), scaled by the weighted mean scale 0.4 + 0.4 + 0.2 * 3.
  np.testing.assert_allclose(aggregate, 1.4 * ones, rtol=1e-6)
  assert compressor.uplink_bits == 623 + 32 * 12


def test_uplink_bits_are_exact():
  lay = layout()
  assert quantize.float32(lay).uplink_bits == 32 * 623
  assert quantize.kquant(lay, k=4).uplink_bits == 12 * 64 * 2
  assert quantize.kquant(lay, k=3).uplink_bits == 12 * 64 * 2
  assert quantize.kquant(lay, k=5).uplink_bits == 12 * 64 * 4
  assert quantize.qsgd(lay, levels=4).uplink_bits == 623 * 4 + 32 * 12
  assert quantize.terngrad(lay).uplink_bits == 2 * 623 + 32 * 12
  with pytest.raises(ValueError, match="compressor 'zip'"):
    quantize.by_name("zip", lay)


def test_client_minmax_range_covers_every_included_client():
  lay = layout()
  updates = jax.random.normal(jax.random.key(4), (4, 12, 64))
  updates = updates.at[3].set(100.0)  # an excluded client does not widen the range
  include = jnp.array([True, True, True, False])
  spec = coordinator.range_from_client_minmax(updates, include, lay, per_tensor=False,
                                              min_width=1e-6)
  np.testing.assert_allclose(spec.lo, updates[:3].min(axis=(0, 2)), rtol=1e-6)
  np.testing.assert_allclose(spec.hi, updates[:3].max(axis=(0, 2)), rtol=1e-6)
  per_tensor = coordinator.range_from_client_minmax(updates, include, lay, per_tensor=True,
                                                    min_width=1e-6)
  for leaf in range(len(lay.rows)):
    rows = lay.row_leaf == leaf
    assert np.unique(np.asarray(per_tensor.hi)[rows]).size == 1
    np.testing.assert_allclose(per_tensor.hi[rows][0], np.asarray(spec.hi)[rows].max())


def test_ranges_are_widened_never_empty():
  lay = layout()
  spec = coordinator.range_from_aggregate(jnp.zeros((12, 64)), lay, per_tensor=False,
                                          margin=2.0, min_width=1e-3)
  np.testing.assert_allclose(spec.hi - spec.lo, 1e-3, rtol=1e-5)
  quantize.check_range(spec.lo, spec.hi)
  aggregate = jnp.ones((12, 64)) * 0.25
  spec = coordinator.range_from_aggregate(aggregate, lay, per_tensor=True, margin=2.0,
                                          min_width=1e-3)
  np.testing.assert_allclose(spec.hi, 0.5)


def test_k_schedule():
  schedule = ((0, 4), (10, 16), (20, 256))
  assert [coordinator.k_for_round(r, 2, schedule) for r in (0, 9, 10, 25)] == [4, 4, 16, 256]
  assert coordinator.k_for_round(5, 16) == 16
  assert coordinator.range_message_bits(layout(), per_tensor=True) == 64 * 3 + 8


@pytest.mark.parametrize("error_feedback", [False, True])
def test_pytree_compressor_round_trip_and_error_feedback(error_feedback):
  lay = layout()
  tc = quantize.for_pytrees(quantize.kquant(lay, k=16, stochastic=False), lay,
                            error_feedback=error_feedback)
  update = jax.tree.map(lambda a: 0.2 * jax.random.normal(jax.random.key(a.size), a.shape),
                        PARAMS)
  spec = coordinator.fixed_range(lay, 1.0)
  step = 2.0 / 15
  state = tc.init(PARAMS)
  np.testing.assert_array_equal(state.error, np.zeros((12, 64)))
  prepared = tc.prepare(update, state)
  np.testing.assert_array_equal(prepared.v, buckets.to_buckets(update, lay))  # zero residual
  message, state = tc.encode(prepared, spec, jax.random.key(0))
  decoded = tc.decode(message, spec)
  chex.assert_trees_all_equal_structs(decoded, update)
  # Nearest rounding: within half a bin of the update.
  chex.assert_trees_all_close(decoded, update, atol=step / 2 * (1 + 1e-5))
  residual = jax.tree.map(jnp.subtract, update, decoded)
  if error_feedback:  # the state holds exactly what the message lost
    chex.assert_trees_all_close(buckets.from_buckets(state.error, lay), residual, atol=1e-6)
    # Sending the same update again: the residual is added, and the second message carries it.
    again = tc.prepare(update, state)
    np.testing.assert_allclose(again.v, buckets.to_buckets(update, lay) + state.error, atol=0)
    message2, _ = tc.encode(again, spec, jax.random.key(1))
    chex.assert_trees_all_close(tc.decode(message2, spec),
                                jax.tree.map(jnp.add, update, residual),
                                atol=step / 2 * (1 + 1e-5))
    assert not np.array_equal(message2, message)
  else:
    np.testing.assert_array_equal(state.error, 0.0)


def test_pytree_compressor_drops_the_residual_where_the_update_was_not_finite():
  lay = layout()
  tc = quantize.for_pytrees(quantize.kquant(lay, k=4, stochastic=False), lay,
                            error_feedback=True)
  update = jax.tree.map(lambda a: jnp.full(a.shape, 0.3), PARAMS)
  update["w"] = update["w"].at[0, 0].set(jnp.nan).at[0, 1].set(jnp.inf)
  prepared = tc.prepare(update, tc.init(PARAMS))
  assert int(jnp.sum(~prepared.finite)) == 2
  assert bool(jnp.all(jnp.isfinite(prepared.v)))  # non-finite entries enter as 0
  _, state = tc.encode(prepared, coordinator.fixed_range(lay, 1.0), jax.random.key(0))
  error = buckets.from_buckets(state.error, lay)["w"]
  np.testing.assert_array_equal(error[0, :2], 0.0)
  assert float(jnp.abs(error).max()) > 0  # elsewhere 0.3 is not on the K=4 grid
