"""research/nonlocal_cnn: shapes, the two-stage data flow, bad input, parameter parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.nonlocal_cnn import data, model


def build(kind, impl="reference", abstract=True, **kw):
  """A small model; by default its params as shapes only (`trained_like` fills them)."""
  sizes = dict(channels=1, features=16, depth=4, factor=4, global_depth=1)
  sizes.update(kw)
  return model.build(kind, 0, impl=impl, abstract=abstract, **sizes)


def trained_like(params, seed=1):
  """Random non-zero weights everywhere (the zero-initialized W and FiLM would hide the paths);
  drawn with numpy (no compile per leaf shape)."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [jnp.asarray(0.1 * rng.standard_normal(l.shape), jnp.float32)
                                   for l in leaves])


@pytest.mark.parametrize("kind", model.MODELS)
def test_output_shape(kind):
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
  apply, params, _ = build(kind)
  out = jax.jit(apply)(trained_like(params), x)
  assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["two_stage",
                                  pytest.param("full_nonlocal", marks=pytest.mark.slow)])
def test_pallas_equals_reference(kind):
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
  apply, params, _ = build(kind)
  params = trained_like(params)
  pallas_apply = build(kind, impl="pallas")[0]
  np.testing.assert_allclose(jax.jit(pallas_apply)(params, x), jax.jit(apply)(params, x),
                             atol=1e-5, rtol=1e-5)


def test_two_stage_queries_attend_to_the_downscaled_image():
  apply, params, _ = build("two_stage")
  params = trained_like(params)
  x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 1))
  captured = {}
  original = model.attend

  def spy(q, k, v, impl):
    captured.setdefault("shapes", []).append((q.shape, k.shape))
    return original(q, k, v, impl)

  model.attend = spy
  try:
    jitted = jax.jit(apply)
    jitted(params, x)  # traced here, with the spy
  finally:
    model.attend = original
  # Stage one: self-attention on the 8x8 image; stage two: 32x32 queries, 8x8 keys.
  assert captured["shapes"] == [((1, 64, 8), (1, 64, 8)), ((1, 1024, 8), (1, 64, 8))]
  # The global parameters matter: changing a far-away region changes every output pixel's
  # stage-two input only through stage one (the trunk's receptive field is 13 pixels).
  far = x.at[:, 24:, 24:, :].set(0.0)
  delta = jnp.abs(jitted(params, far) - jitted(params, x))[0, :4, :4, 0]
  assert float(delta.min()) > 0
  plain_apply, plain_params, _ = build("plain")
  plain_apply = jax.jit(plain_apply)
  plain_params = trained_like(plain_params)
  plain_delta = jnp.abs(plain_apply(plain_params, far) - plain_apply(plain_params, x))[0, :4, :4]
  assert float(plain_delta.max()) == 0.0


@pytest.mark.parametrize("depth", [4, 6])
def test_plain_receptive_field_is_two_per_conv_plus_one(depth):
  """Head conv + `depth` convs + tail conv, all 3 x 3: a window of 2 * (depth + 2) + 1 pixels
  (13 at depth 4, 17 at depth 6, the exposure task's argument in research/nonlocal_cnn/data.py)."""
  radius = depth + 2
  apply, params, _ = build("plain", depth=depth, features=16)
  apply, params = jax.jit(apply), trained_like(params)
  x = jax.random.uniform(jax.random.key(0), (1, 48, 48, 1))
  centre = 24

  def reach(offset):
    bumped = x.at[0, centre, centre + offset, 0].add(1.0)
    return float(jnp.abs(apply(params, bumped) - apply(params, x))[0, centre, centre, 0])

  assert reach(radius) > 0 and reach(radius + 1) == 0.0
  assert 2 * radius + 1 == {4: 13, 6: 17}[depth]


def test_psnr_in_db_and_infinite_for_an_exact_estimate():
  clean = np.full((4, 4, 1), 0.5, np.float32)
  assert model.psnr(clean, clean) == float("inf")
  np.testing.assert_allclose(model.psnr(clean, clean + 0.1), 20.0, rtol=1e-5)  # mse 1e-2
  # The estimate is clipped to [0, 1] first: 1.5 counts as 1.0.
  np.testing.assert_allclose(model.psnr(clean, clean + 1.0), model.psnr(clean, clean + 0.5))


def test_plain_baseline_matches_the_parameter_count():
  two_stage = model.param_count(build("two_stage", features=32, depth=6, global_depth=2)[1])
  width = model.plain_features_matching(two_stage, 1, 6)
  plain = model.param_count(build("plain", features=width, depth=6)[1])
  assert abs(plain - two_stage) / two_stage < 0.03


@pytest.mark.parametrize("shape, match", [
    ((1, 2, 2, 1), r"image of 2x2 is smaller than the downscale factor 4"),
    ((1, 30, 32, 1), r"image of 30x32 is not divisible by the downscale factor 4"),
    ((1, 32, 32, 3), r"got 3 channels, expected 1"),
    ((32, 32, 1), r"expected \(B, H, W, C\)"),
])
def test_bad_images_are_refused(shape, match):
  apply, params, _ = build("two_stage")
  with pytest.raises(ValueError, match=match):
    apply(params, jnp.zeros(shape))


def test_denoise_pads_by_reflection_and_refuses_nan():
  apply, params, _ = build("two_stage")
  apply, params = jax.jit(apply), trained_like(params)
  image = np.random.default_rng(0).uniform(size=(30, 37, 1)).astype(np.float32)
  out = model.denoise(apply, params, image, factor=4, channels=1)
  assert out.shape == image.shape
  padded, _ = model.pad_to_multiple(image, 4)
  np.testing.assert_allclose(out, np.asarray(apply(params, padded[None]))[0, :30, :37])
  image[3, 4, 0] = np.nan
  with pytest.raises(ValueError, match="1 pixels are NaN or inf"):
    model.denoise(apply, params, image, factor=4, channels=1)
  with pytest.raises(ValueError, match="smaller than the downscale factor 4"):
    model.denoise(apply, params, np.zeros((3, 9, 1), np.float32), factor=4, channels=1)
  with pytest.raises(ValueError, match=r"expected \(H, W, 1\)"):
    model.denoise(apply, params, np.zeros((8, 8, 3), np.float32), factor=4, channels=1)


def test_data_patches_noise_and_held_out_split():
  assert not set(data.TRAIN_IMAGES) & set(data.TEST_IMAGES)
  images = [np.arange(100 * 80, dtype=np.float32).reshape(100, 80, 1) / 8000]
  a = data.random_patches(images, 16, 5, np.random.default_rng(3))
  b = data.random_patches(images, 16, 5, np.random.default_rng(3))
  assert a.shape == (5, 16, 16, 1) and np.array_equal(a, b)
  noisy = data.add_noise(np.zeros((64, 64, 1), np.float32), 25, np.random.default_rng(0))
  assert abs(float(noisy.std()) - 25 / 255) < 0.01
  crops = data.test_images(128)
  assert set(crops) == set(data.TEST_IMAGES) and all(c.shape == (128, 128, 1)
                                                    for c in crops.values())
  with pytest.raises(ValueError, match="smaller than the crop"):
    data.center_crop(np.zeros((10, 10, 1)), 16)


def _attention_shapes(kind):
  """The (q, k) shapes of every attention call in one traced forward pass."""
  apply, params, _ = build(kind)
  captured, original = [], model.attend

  def spy(q, k, v, impl):
    captured.append((q.shape, k.shape))
    return original(q, k, v, impl)

  model.attend = spy
  try:
    jax.jit(apply).lower(trained_like(params), jnp.zeros((1, 32, 32, 1)))
  finally:
    model.attend = original
  return captured


def test_ablation_variants_keep_only_their_path():
  """two_stage_kv: stage one feeds only the cross block's keys / values (no FiLM layer);
  two_stage_film: only the FiLM scale / shift (no cross block). Both otherwise equal (a)."""
  stage_one, cross = ((1, 64, 8), (1, 64, 8)), ((1, 1024, 8), (1, 64, 8))
  assert _attention_shapes("two_stage") == [stage_one, cross]
  assert _attention_shapes("two_stage_kv") == [stage_one, cross]
  assert _attention_shapes("two_stage_film") == [stage_one]
  count = {k: model.param_count(build(k)[1]) for k in model.GLOBAL_MODES}
  film_layer = 16 * 32 + 32          # Linear(features, 2 * features)
  cross_block = 3 * (16 * 8 + 8) + 8 * 16 + 16   # theta, phi, g and the output projection
  assert count["two_stage"] - count["two_stage_kv"] == film_layer
  assert count["two_stage"] - count["two_stage_film"] == cross_block
  # The FiLM-only variant still carries image-wide context into every pixel.
  apply, params, _ = build("two_stage_film")
  apply, params = jax.jit(apply), trained_like(params)
  x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 1))
  delta = jnp.abs(apply(params, x.at[:, 24:, 24:, :].set(0.0)) - apply(params, x))
  assert float(delta[0, :4, :4, 0].min()) > 0
  with pytest.raises(ValueError, match="global_mode: got 'all'"):
    model.TwoStage(global_mode="all", rngs=nnx.Rngs(0))
