"""research/nonlocal_cnn/data.py, the exposure task: seeded draws, the exact inverse, refusals."""

import numpy as np
import pytest

from research.nonlocal_cnn import data


@pytest.fixture(scope="module")
def scene():
  return data.resized_images(["camera"], 64)["camera"]


def test_draws_are_seeded_and_within_the_ranges():
  a = [data.sample_exposure(np.random.default_rng(5)) for _ in range(2)]
  assert a[0] == a[1]
  rng = np.random.default_rng(0)
  draws = [data.sample_exposure(rng) for _ in range(200)]
  for field in ("gain", "gamma", "strength"):
    lo, hi = data.EXPOSURE_RANGES[field]
    values = [getattr(d, field) for d in draws]
    assert lo <= min(values) and max(values) <= hi
    assert max(values) - min(values) > 0.8 * (hi - lo)  # the draw covers its range
  lo, hi = data.EXPOSURE_RANGES["centre"]
  assert all(lo <= c <= hi for d in draws for c in d.centre)
  # gamma is log-uniform: as many draws below 1 as above
  assert 70 < sum(d.gamma < 1 for d in draws) < 130


def test_restore_inverts_degrade(scene):
  rng = np.random.default_rng(1)
  for _ in range(5):
    exposure = data.sample_exposure(rng)
    degraded = data.degrade_exposure(scene, exposure)
    assert degraded.dtype == np.float32 and degraded.shape == scene.shape
    assert 0 <= degraded.min() and degraded.max() <= 1
    assert np.abs(degraded - scene).mean() > 0.01
    np.testing.assert_allclose(data.restore_exposure(degraded, exposure), scene, atol=2e-4)


def test_the_change_is_image_wide_and_smooth():
  exposure = data.Exposure(gain=0.5, gamma=1.0, strength=0.4, centre=(0.5, 0.5))
  field = data.vignette(64, 64, exposure)[..., 0]
  corner_r2 = 2 * (31.5 / 64) ** 2  # pixel centres; r^2 / 0.5 stays below 1 here
  assert field[31:33, 31:33].min() > 0.99
  assert field.min() == pytest.approx(1 - 0.4 * corner_r2 / 0.5)
  assert np.abs(np.diff(field, axis=0)).max() < 0.02  # no edges: a low-frequency field
  flat = np.full((64, 64, 1), 0.8, np.float32)
  out = data.degrade_exposure(flat, exposure)[..., 0]
  np.testing.assert_allclose(out, 0.8 * 0.5 * field, rtol=1e-6)


def test_each_image_of_a_batch_gets_its_own_draw(scene):
  batch = np.stack([scene, scene])
  one = data.degrade_exposure_batch(batch, np.random.default_rng(3))
  again = data.degrade_exposure_batch(batch, np.random.default_rng(3))
  assert np.array_equal(one, again) and not np.allclose(one[0], one[1])


def test_resized_images_are_the_whole_scene(scene):
  from research.common import data as common_data
  from skimage.transform import resize
  full = common_data.bundled_image("camera", grayscale=True)  # 512 x 512: the square is all of it
  np.testing.assert_allclose(scene, resize(full, (64, 64), anti_aliasing=True), atol=1e-6)
  coins = data.resized_images(["coins"], 32)["coins"]
  assert coins.shape == (32, 32, 1) and 0 <= coins.min() and coins.max() <= 1
  with pytest.raises(ValueError, match="size: got 0"):
    data.resized_images(["coins"], 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gain=0.0), r"exposure gain: got 0.0, expected 0 < value <= 1"),
    (dict(gain=1.5), r"exposure gain: got 1.5"),
    (dict(gamma=-1.0), r"exposure gamma: got -1.0, expected 0 < value"),
    (dict(strength=1.0), r"exposure strength: got 1.0, expected 0 <= value < 1"),
    (dict(centre=(0.5, 1.2)), r"exposure centre: got 1.2"),
    (dict(gain=float("nan")), r"exposure gain: got nan"),
])
def test_bad_exposures_are_refused(kwargs, match):
  fields = dict(gain=0.5, gamma=1.0, strength=0.2, centre=(0.5, 0.5))
  with pytest.raises(ValueError, match=match):
    data.Exposure(**{**fields, **kwargs})


@pytest.mark.parametrize("change, match", [
    (dict(gamma=(0.0, 2.0)), r"exposure range 'gamma': got \(0.0, 2.0\), expected \(lo, hi\) "
                             r"with 0 < lo <= hi"),
    (dict(gain=(0.9, 0.5)), r"exposure range 'gain': got \(0.9, 0.5\)"),
    (dict(strength=(0.0,)), r"exposure range 'strength'"),
    (dict(blur=(0, 1)), r"exposure ranges: got keys \['blur', "),
])
def test_bad_ranges_are_refused(change, match):
  with pytest.raises(ValueError, match=match):
    data.sample_exposure(np.random.default_rng(0), {**data.EXPOSURE_RANGES, **change})


def test_images_outside_the_unit_range_are_refused():
  exposure = data.Exposure(gain=0.5, gamma=1.0, strength=0.2, centre=(0.5, 0.5))
  with pytest.raises(ValueError, match=r"clean image: expected finite values in \[0, 1\]"):
    data.degrade_exposure(np.full((4, 4, 1), 1.5), exposure)
  with pytest.raises(ValueError, match=r"clean image: got shape \(4, 4\), expected \(H, W, C\)"):
    data.degrade_exposure(np.zeros((4, 4)), exposure)
  with pytest.raises(ValueError, match=r"degraded image: expected finite values"):
    data.restore_exposure(np.full((4, 4, 1), np.nan), exposure)
