"""Reverb-style replay table: accounting, FIFO, selector frequencies, rate limiter, bad input."""

import chex
import numpy as np
import pytest

from research.rl_cache import replay

T = 5
SPEC = replay.ItemSpec.of(obs=((T, 4), np.float32), action=((T,), np.int32),
                          reward=((T,), np.float32))


def _item(i: int) -> dict:
  """A trajectory whose every entry encodes `i`, so a sampled item can be traced to its insert."""
  return {"obs": np.full((T, 4), i, np.float32), "action": np.full((T,), i, np.int32),
          "reward": np.full((T,), i, np.float32)}


def _table(max_size=100, **kwargs) -> replay.Table:
  return replay.new_table(replay.TableConfig(max_size=max_size, **kwargs), SPEC)


def _fill(table, n, start=0, priority=lambda i: 1.0):
  for i in range(start, start + n):
    table = replay.insert(table, _item(i), priority(i))
  return table


def _same(a: replay.Table, b: replay.Table) -> bool:
  return (a.items is b.items and a.keys is b.keys and a.priorities is b.priorities
          and a.times_sampled is b.times_sampled and
          (a.inserted, a.sampled, a.evicted) == (b.inserted, b.sampled, b.evicted))


def test_insert_and_sample_shapes_and_trace_back_to_keys():
  table = _fill(_table(), 6)
  table, batch, keys, probs = replay.sample(table, 4, np.random.default_rng(0))
  chex.assert_shape(batch["obs"], (4, T, 4))
  chex.assert_type([batch["obs"], batch["action"], keys, probs],
                   [np.float32, np.int32, np.int64, np.float64])
  np.testing.assert_array_equal(batch["action"][:, 0], keys)  # item i holds i, key i
  np.testing.assert_allclose(probs, 1 / 6)
  assert table.sampled == 4 and table.times_sampled.sum() == 4
  with pytest.raises(ValueError):  # the state cannot be mutated in place
    table.priorities[0] = 5.0


def test_fifo_eviction_keeps_the_newest_and_counts_add_up():
  table = _fill(_table(max_size=3), 5)
  np.testing.assert_array_equal(table.keys, [2, 3, 4])
  np.testing.assert_array_equal([item[1][0] for item in table.items], [2, 3, 4])
  acc = replay.accounting(table)
  assert (acc.inserted, acc.size, acc.evicted) == (5, 3, 2) and acc.balanced
  table = replay.insert(table, _item(5))
  np.testing.assert_array_equal(table.keys, [3, 4, 5])  # the oldest went first


def test_counts_add_up_and_every_sampled_key_was_in_the_table():
  rng = np.random.default_rng(1)
  table = _table(max_size=20, selector="prioritized", priority_exponent=0.6)
  next_item = 0
  for _ in range(600):
    if rng.random() < 0.5 or table.size == 0:
      table = replay.insert(table, _item(next_item), float(rng.uniform(0, 3)))
      next_item += 1
    else:
      held = set(table.keys.tolist())
      n = int(rng.integers(1, table.size + 1))
      table, batch, keys, _ = replay.sample(table, n, rng)
      assert set(keys.tolist()) <= held
      np.testing.assert_array_equal(batch["action"][:, -1], keys)
      if rng.random() < 0.5:
        table = replay.update_priorities(table, keys, rng.uniform(0, 3, size=n))
    acc = replay.accounting(table)
    assert acc.balanced, acc
    assert acc.inserted == acc.size + acc.evicted
  assert acc.evicted > 100 and acc.sampled > 1000 and acc.sampled_evicted > 0


def test_uniform_sampling_frequencies_pass_a_chi_square_test():
  table = _fill(_table(max_size=10), 10)
  rng = np.random.default_rng(2)
  counts = np.zeros(10)
  for _ in range(2000):
    table, _, keys, _ = replay.sample(table, 10, rng)
    np.add.at(counts, keys, 1)
  expected = counts.sum() / 10
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 27.88  # the 0.999 quantile of chi-square with 9 degrees of freedom
  np.testing.assert_array_equal(table.times_sampled, counts)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_prioritized_frequencies_follow_priority_to_the_alpha(alpha):
  priorities = np.arange(1.0, 9.0)
  table = _fill(_table(max_size=8, selector="prioritized", priority_exponent=alpha), 8,
                priority=lambda i: priorities[i])
  expected_p = priorities**alpha / (priorities**alpha).sum()
  np.testing.assert_allclose(replay.probabilities(table), expected_p)
  rng = np.random.default_rng(3)
  counts = np.zeros(8)
  for _ in range(2500):
    table, _, keys, probs = replay.sample(table, 8, rng)
    np.testing.assert_allclose(probs, expected_p[keys])
    np.add.at(counts, keys, 1)
  n = counts.sum()
  chi2 = ((counts - n * expected_p) ** 2 / (n * expected_p)).sum()
  assert chi2 < 24.32  # the 0.999 quantile of chi-square with 7 degrees of freedom
  uniform = np.full(8, n / 8)  # and the test can tell: uniform frequencies fail it
  assert ((counts - uniform) ** 2 / uniform).sum() > 100


def test_update_priorities_changes_the_distribution_and_skips_evicted_keys():
  table = _fill(_table(max_size=4, selector="prioritized"), 6)  # keys 2 ... 5
  table = replay.update_priorities(table, [0, 3, 5, 5], [7.0, 0.0, 2.0, 3.0])
  np.testing.assert_allclose(table.priorities, [1.0, 0.0, 1.0, 3.0])  # key 0 evicted; last wins
  np.testing.assert_allclose(replay.probabilities(table), [0.2, 0.0, 0.2, 0.6])
  with pytest.raises(ValueError, match=r"keys: \[6\] were never inserted"):
    replay.update_priorities(table, [6], [1.0])
  with pytest.raises(ValueError, match="finite numbers >= 0"):
    replay.update_priorities(table, [3], [-1.0])


@pytest.mark.parametrize("field, value, match", [
    ("obs", np.zeros((T, 3), np.float32),
     r"field 'obs': got shape \(5, 3\) dtype float32, expected shape \(5, 4\) dtype float32"),
    ("action", np.zeros((T,), np.int64),
     r"field 'action': got shape \(5,\) dtype int64, expected shape \(5,\) dtype int32"),
    ("reward", None, r"missing \['reward'\]"),
    ("extra", np.zeros(1), r"unexpected \['extra'\]"),
])
def test_trajectory_of_the_wrong_shape_is_refused_and_the_table_unchanged(field, value, match):
  table = _fill(_table(max_size=3), 3)
  item = _item(9)
  if value is None:
    del item[field]
  else:
    item[field] = value
  with pytest.raises(ValueError, match=match):
    replay.insert(table, item)
  assert _same(table, _fill(table, 0))
  np.testing.assert_array_equal(table.keys, [0, 1, 2])
  with pytest.raises(ValueError, match="priority"):
    replay.insert(table, _item(9), priority=float("nan"))


def test_sample_larger_than_the_table_is_refused_and_the_table_unchanged():
  table = _fill(_table(), 3)
  with pytest.raises(ValueError, match=r"sample n=4: the table holds 3 items"):
    replay.sample(table, 4, np.random.default_rng(0))
  with pytest.raises(ValueError, match="sample n: got 0"):
    replay.sample(table, 0, np.random.default_rng(0))
  with pytest.raises(ValueError, match="numpy Generator"):
    replay.sample(table, 1, 0)
  assert table.sampled == 0 and table.times_sampled.sum() == 0
  assert not replay.can_sample(table, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_size=0), "max_size: got 0"),
    (dict(max_size=4, selector="lifo"), "selector: got 'lifo'"),
    (dict(max_size=4, remover="lifo"), "remover: got 'lifo'"),
    (dict(max_size=4, priority_exponent=-1.0), "priority_exponent: got -1.0"),
    (dict(max_size=4, min_size_to_sample=5), r"min_size_to_sample: got 5, expected an int in 1"),
    (dict(max_size=4, samples_per_insert=0.0, error_buffer=2.0), "samples_per_insert: got 0.0"),
    (dict(max_size=4, samples_per_insert=4.0, error_buffer=2.0),
     r"error_buffer: got 2.0, expected a finite number >= max\(1, samples_per_insert\) = 4.0"),
    (dict(max_size=4, samples_per_insert=1.0), "error_buffer: got None"),
    (dict(max_size=4, error_buffer=2.0), "error_buffer: got 2.0 without samples_per_insert"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    replay.TableConfig(**kwargs)


def test_min_size_limiter_waits_for_min_size_only():
  table = _table(max_size=10, min_size_to_sample=3)
  for i in range(3):
    assert not replay.can_sample(table) and replay.can_insert(table)
    table = replay.insert(table, _item(i))
  assert replay.can_sample(table, 3) and not replay.can_sample(table, 4)
  for _ in range(50):  # no ratio kept: sample as much as wanted
    table, *_ = replay.sample(table, 3, np.random.default_rng(0))
  assert replay.can_insert(table) and replay.can_sample(table)


@pytest.mark.parametrize("spi, error_buffer, min_size, max_batch", [
    (0.5, 2.0, 10, 1), (4.0, 8.0, 20, 8), (1.0, 3.0, 5, 3)])
def test_rate_limiter_keeps_samples_per_insert_within_the_error_buffer(
    spi, error_buffer, min_size, max_batch):
  table = _table(max_size=50, samples_per_insert=spi, min_size_to_sample=min_size,
                 error_buffer=error_buffer)
  rng = np.random.default_rng(4)
  blocked = {"insert": 0, "sample": 0}
  for step in range(3000):
    # A producer and a consumer whose relative speed changes every 150 steps; each acts only
    # when the limiter allows.
    if step % 150 == 0:
      p_insert = rng.choice([0.1, 0.5, 0.9])
    if rng.random() < p_insert:
      if replay.can_insert(table):
        table = replay.insert(table, _item(table.inserted))
      else:
        blocked["insert"] += 1
    else:
      n = int(rng.integers(1, max_batch + 1))
      if replay.can_sample(table, n):
        table, *_ = replay.sample(table, n, rng)
      else:
        blocked["sample"] += 1
    if table.size >= min_size:  # Reverb's error, counted from the end of stage 1
      error = (table.inserted - min_size) * spi - table.sampled
      assert -error_buffer <= error <= error_buffer, (step, error)
    else:
      assert table.sampled == 0
  assert blocked["insert"] > 50 and blocked["sample"] > 50  # both sides were held back
  assert table.inserted > 200 and replay.accounting(table).balanced
  ratio = table.sampled / (table.inserted - min_size)
  assert abs(ratio - spi) <= error_buffer / (table.inserted - min_size) + 1e-12
