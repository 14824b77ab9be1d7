"""Variants: shapes, the data, training lowers the loss."""

import chex
import jax
import numpy as np
import pytest

from research.edge import variants

from tests.edge import _tiny


@pytest.mark.parametrize("spec", [s for stage in variants.DEFAULT_VARIANTS for s in stage],
                         ids=lambda s: s.key)
def test_every_default_variant_maps_frames_to_its_stage_output(spec):
  apply, params = variants.build(spec, 8, seed=0)
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  out = apply(params, x)
  chex.assert_shape(out, (2, 8, 8, 1) if spec.stage == "denoise" else (2, 10))
  chex.assert_tree_all_finite(out)


def test_a_fresh_denoiser_is_the_identity_zero_init_noise_head():
  spec = variants.VariantSpec("denoise", "d", "residual_cnn", (4,))
  apply, params = variants.build(spec, 8, seed=0)
  x = _tiny.frame()
  np.testing.assert_allclose(apply(params, x), x)


def test_digit_frames_are_seeded_and_noisy_at_the_given_sigma():
  train_a, test_a = variants.digit_frames(16, 0.25, seed=3)
  train_b, _ = variants.digit_frames(16, 0.25, seed=3)
  np.testing.assert_array_equal(train_a.noisy, train_b.noisy)
  chex.assert_shape(test_a.clean, (450, 16, 16, 1))
  assert abs(float(np.std(train_a.noisy - train_a.clean)) - 0.25) < 0.005
  with pytest.raises(ValueError, match="image_size=12"):
    variants.digit_frames(12, 0.25, seed=0)


def test_bad_variant_specs_are_refused_naming_them():
  with pytest.raises(ValueError, match="classify/x: kind 'residual_cnn'"):
    variants.VariantSpec("classify", "x", "residual_cnn", (4,))
  with pytest.raises(ValueError, match="stage 'resize'"):
    variants.VariantSpec("resize", "x", "identity")
  with pytest.raises(ValueError, match="poolings do not fit image_size=8"):
    variants.build(variants.VariantSpec("classify", "x", "cnn", (4, 4, 4, 4)), 8, seed=0)


def test_training_lowers_the_loss():
  train, _ = variants.digit_frames(8, 0.25, seed=0)
  config = variants.TrainConfig(steps=60, batch_size=64, learning_rate=1e-2)
  spec = variants.VariantSpec("classify", "m", "mlp", (16,))
  apply, params = variants.build(spec, 8, seed=0)
  import optax
  before = float(optax.softmax_cross_entropy_with_integer_labels(
      apply(params, train.noisy), train.labels).mean())
  trained, _ = variants.train_classifier(spec, train.noisy, train.labels, 8, config, seed=0)
  after = float(optax.softmax_cross_entropy_with_integer_labels(
      apply(trained, train.noisy), train.labels).mean())
  assert after < 0.7 * before
  den = variants.VariantSpec("denoise", "d", "residual_cnn", (4,))
  _, last = variants.train_denoiser(den, train, 8, config, seed=0)
  assert last < float(np.mean((train.noisy - train.clean) ** 2))
