"""Data from bundled photographs (no download) for the two tasks: denoising (Gaussian noise) and
an image-wide exposure change (the second half of this file): training patches, held-out images.

BSD68 is not shipped with any package here, so the task uses scikit-image's and scikit-learn's
bundled photographs in greyscale: `TRAIN_IMAGES` for patches, `TEST_IMAGES` (never seen in
training) center-cropped to `test_size` for evaluation. Noise is additive white Gaussian with
standard deviation sigma / 255 on [0, 1] images, drawn from a numpy Generator so a seed fixes
every patch and every noise sample.
"""

from __future__ import annotations

import dataclasses
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


# ---------------------------------------------------------------------------------------------
# Second task: an image-wide exposure change (HDRNet-style enhancement), where the answer depends
# on the whole image. Each image (each training patch, each held-out image) gets its own draw of
#   degraded = gain * vignette(y, x) * clean ** gamma,
#   vignette(y, x) = 1 - strength * min(1, ((y - cy)^2 + (x - cx)^2) / 0.5)
# with (y, x) in [0, 1] across the image. Every factor is at most 1 on [0, 1] images, so nothing
# is clipped and the change is invertible: clean = (degraded / (gain * vignette)) ** (1 / gamma)
# (`restore_exposure`). From a 17-pixel window (the plain CNN's receptive field at depth 6: head,
# 6 and tail 3 x 3 convolutions) a dark patch of a bright scene and a bright patch of a dark one
# look alike; the whole image tells them apart.

EXPOSURE_RANGES = {"gain": (0.25, 1.0), "gamma": (0.5, 2.0), "strength": (0.0, 0.6),
                   "centre": (0.25, 0.75)}  # the draw of `sample_exposure` (gamma log-uniform)
_EXPOSURE_LIMITS = {"gain": "0 < lo <= hi <= 1", "gamma": "0 < lo <= hi",
                    "strength": "0 <= lo <= hi < 1", "centre": "0 <= lo <= hi <= 1"}


@dataclasses.dataclass(frozen=True)
class Exposure:
  """One image's exposure change: gain, gamma, vignette strength and centre (cy, cx)."""
  gain: float
  gamma: float
  strength: float
  centre: tuple[float, float]

  def __post_init__(self):
    for field, value in (("gain", self.gain), ("gamma", self.gamma),
                         ("strength", self.strength), ("centre", self.centre[0]),
                         ("centre", self.centre[1])):
      if not _within(field, value, value):
        raise ValueError(f"exposure {field}: got {value}, expected "
                         f"{_EXPOSURE_LIMITS[field].replace('lo <= hi', 'value')}")


def _within(field: str, lo: float, hi: float) -> bool:
  if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
    return False
  return {"gain": 0 < lo and hi <= 1, "gamma": 0 < lo, "strength": 0 <= lo and hi < 1,
          "centre": 0 <= lo and hi <= 1}[field]


def check_exposure_ranges(ranges: dict) -> None:
  """Refuses ranges `sample_exposure` cannot draw from (naming the field and the bound)."""
  if set(ranges) != set(EXPOSURE_RANGES):
    raise ValueError(f"exposure ranges: got keys {sorted(ranges)}, expected "
                     f"{sorted(EXPOSURE_RANGES)}")
  for field, bounds in ranges.items():
    if len(bounds) != 2 or not _within(field, float(bounds[0]), float(bounds[1])):
      raise ValueError(f"exposure range {field!r}: got {tuple(bounds)}, expected (lo, hi) with "
                       f"{_EXPOSURE_LIMITS[field]}")


def sample_exposure(rng: np.random.Generator, ranges: dict | None = None) -> Exposure:
  ranges = EXPOSURE_RANGES if ranges is None else ranges
  check_exposure_ranges(ranges)
  u = lambda field: float(rng.uniform(*ranges[field]))
  log_gamma = rng.uniform(np.log(ranges["gamma"][0]), np.log(ranges["gamma"][1]))
  return Exposure(gain=u("gain"), gamma=float(np.exp(log_gamma)), strength=u("strength"),
                  centre=(u("centre"), u("centre")))


def vignette(height: int, width: int, exposure: Exposure) -> np.ndarray:
  """The (H, W, 1) vignette field, in [1 - strength, 1] (1 - strength where the squared
  distance from the centre reaches 0.5)."""
  y = (np.arange(height, dtype=np.float64) + 0.5) / height - exposure.centre[0]
  x = (np.arange(width, dtype=np.float64) + 0.5) / width - exposure.centre[1]
  r2 = y[:, None] ** 2 + x[None, :] ** 2
  return (1.0 - exposure.strength * np.minimum(1.0, r2 / 0.5))[..., None]


def _check_unit_image(image: np.ndarray, name: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"{name}: got shape {image.shape}, expected (H, W, C)")
  if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
    raise ValueError(f"{name}: expected finite values in [0, 1]")
  return image.astype(np.float64)


def degrade_exposure(clean: np.ndarray, exposure: Exposure) -> np.ndarray:
  """gain * vignette * clean ** gamma for one (H, W, C) image in [0, 1]; float32, in [0, 1]."""
  clean = _check_unit_image(clean, "clean image")
  field = vignette(clean.shape[0], clean.shape[1], exposure)
  return (exposure.gain * field * clean ** exposure.gamma).astype(np.float32)


def restore_exposure(degraded: np.ndarray, exposure: Exposure) -> np.ndarray:
  """The inverse of `degrade_exposure` (the oracle that knows the draw)."""
  degraded = _check_unit_image(degraded, "degraded image")
  field = vignette(degraded.shape[0], degraded.shape[1], exposure)
  return np.clip(degraded / (exposure.gain * field), 0.0, 1.0) ** (1.0 / exposure.gamma)


def degrade_exposure_batch(clean: np.ndarray, rng: np.random.Generator,
                           ranges: dict | None = None) -> np.ndarray:
  """Each image of a (B, H, W, C) batch with its own draw."""
  return np.stack([degrade_exposure(image, sample_exposure(rng, ranges)) for image in clean])


def resized_images(names: Sequence[str], size: int) -> dict[str, np.ndarray]:
  """Each named bundled image's central square, resized (anti-aliased) to size x size: the whole
  scene, which an image-wide change needs (a crop would cut the vignette's context)."""
  from skimage.transform import resize  # pylint: disable=import-outside-toplevel
  if size < 1:
    raise ValueError(f"size: got {size}, expected a positive number of pixels")
  out = {}
  for name in names:
    image = common_data.bundled_image(name, grayscale=True)
    square = center_crop(image, min(image.shape[:2]))
    out[name] = np.clip(resize(square, (size, size), anti_aliasing=True), 0, 1).astype(
        np.float32)
  return out
