"""research/nonlocal_cnn/stats.py against scipy and by construction."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from research.nonlocal_cnn import stats


@pytest.mark.parametrize("positive, negative", [(9, 0), (7, 2), (5, 4), (12, 3), (0, 6), (1, 1)])
def test_sign_test_equals_scipy_binomial(positive, negative):
  d = [0.3] * positive + [-0.1] * negative + [0.0, 0.0]
  got = stats.sign_test(d)
  assert (got["positive"], got["negative"], got["ties"]) == (positive, negative, 2)
  want = scipy_stats.binomtest(positive, positive + negative, 0.5).pvalue
  assert got["p"] == pytest.approx(want, rel=1e-12)


def test_sign_test_of_ties_only_is_one():
  assert stats.sign_test([0.0, 0.0])["p"] == 1.0


def test_bootstrap_interval_is_seeded_and_shrinks_with_more_pairs():
  rng = np.random.default_rng(0)
  few, many = rng.normal(0.5, 1.0, 10), rng.normal(0.5, 1.0, 1000)
  lo, hi = stats.bootstrap_interval(few)
  assert lo < few.mean() < hi
  assert (lo, hi) == stats.bootstrap_interval(few)
  lo2, hi2 = stats.bootstrap_interval(many)
  assert lo2 < 0.5 < hi2 and hi2 - lo2 < (hi - lo) / 5
  # about 1.96 standard errors either side for a large sample
  assert (hi2 - lo2) / 2 == pytest.approx(1.96 * many.std() / np.sqrt(many.size), rel=0.1)
  assert stats.bootstrap_interval([0.25, 0.25, 0.25]) == (0.25, 0.25)
  with pytest.raises(ValueError, match="level: got 1.5"):
    stats.bootstrap_interval(few, level=1.5)
  with pytest.raises(ValueError, match="expected a non-empty 1-D list"):
    stats.bootstrap_interval([])


def test_paired_matches_by_seed_and_sample_and_refuses_missing_pairs():
  ours = {"0": {"a": 30.0, "b": 28.0}, "1": {"a": 31.0, "b": 27.0}}
  other = {"1": {"b": 27.5, "a": 30.0}, "0": {"b": 27.0, "a": 30.5}}
  got = stats.paired(ours, other)
  assert got["pairs"] == 4 and got["mean"] == pytest.approx((-0.5 + 1.0 + 1.0 - 0.5) / 4)
  assert got["sign_test"]["positive"] == 2 and got["sign_test"]["negative"] == 2
  with pytest.raises(ValueError, match=r"\(seed, sample\) sets differ, e.g. \[\('1', 'b'\)\]"):
    stats.paired(ours, {"0": other["0"], "1": {"a": 30.0}})


def test_seed_spread():
  got = stats.seed_spread([1.0, 2.0, 4.0])
  assert got == {"mean": pytest.approx(7 / 3), "std": pytest.approx(np.std([1, 2, 4], ddof=1)),
                 "n": 3}
  assert stats.seed_spread([3.0])["std"] == 0.0
  with pytest.raises(ValueError, match="per-seed values"):
    stats.seed_spread([1.0, float("nan")])
  with pytest.raises(ValueError, match="per-seed values"):
    stats.seed_spread([])
