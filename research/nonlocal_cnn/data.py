"""Denoising data from bundled photographs (no download): training patches, held-out images.

BSD68 is not shipped with any package here, so the task uses scikit-image's and scikit-learn's
bundled photographs in greyscale: `TRAIN_IMAGES` for patches, `TEST_IMAGES` (never seen in
training) center-cropped to `test_size` for evaluation. Noise is additive white Gaussian with
standard deviation sigma / 255 on [0, 1] images, drawn from a numpy Generator so a seed fixes
every patch and every noise sample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from research.common import data as common_data

TRAIN_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "moon",
                "china", "flower", "immunohistochemistry")
TEST_IMAGES = ("camera", "coins", "clock")


def train_images() -> list[np.ndarray]:
  """The training photographs, greyscale (H, W, 1) float32 in [0, 1]."""
  assert not set(TRAIN_IMAGES) & set(TEST_IMAGES)
  return [common_data.bundled_image(n, grayscale=True) for n in TRAIN_IMAGES]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"image of {h}x{w} is smaller than the crop {size}x{size}")
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def test_images(size: int) -> dict[str, np.ndarray]:
  return {n: center_crop(common_data.bundled_image(n, grayscale=True), size) for n in TEST_IMAGES}


def random_patches(images: Sequence[np.ndarray], size: int, count: int,
                   rng: np.random.Generator) -> np.ndarray:
  """`count` random (size, size, C) crops, each from a random image, randomly flipped/rotated."""
  out = []
  for _ in range(count):
    image = images[int(rng.integers(len(images)))]
    top = int(rng.integers(image.shape[0] - size + 1))
    left = int(rng.integers(image.shape[1] - size + 1))
    patch = image[top:top + size, left:left + size]
    patch = np.rot90(patch, int(rng.integers(4)))
    if rng.integers(2):
      patch = patch[:, ::-1]
    out.append(patch)
  return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def add_noise(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  """clean + N(0, (sigma / 255)^2), not clipped (the usual AWGN protocol)."""
  return (clean + rng.normal(scale=sigma / 255.0, size=clean.shape)).astype(np.float32)
