"""The pipeline's stages and their model variants (flax nnx, used functionally), and the data.

The task: a frame of noisy handwritten digits (scikit-learn's 8x8 digits, upsampled to
`image_size`^2 and corrupted with seeded Gaussian noise of std `noise_sigma` on [0, 1]
intensities) goes through two stages:

  stage "denoise":  `identity` (skip the stage) or a residual CNN (DnCNN-style: it predicts the
                    noise) of growing width and depth: `small`, `medium`, `large`;
  stage "classify": a linear softmax (`tiny`), an MLP (`small`), CNNs (`medium`, `large`).

Bigger variants are slower and (on this task) more accurate; which combination fits a latency
budget depends on the device's load, which is what the selector (selector.py) decides.

Each variant is `apply(params, images) -> images or logits` with params a pytree; `fingerprint`
hashes a variant's architecture and parameter values (the profile cache's key: a retrained or
changed model invalidates its cached profile).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
STAGES = ("denoise", "classify")


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """One model variant of one stage: `kind` and its sizes (hashable: a jit cache key)."""
  stage: str
  name: str
  kind: str                       # identity | residual_cnn | linear | mlp | cnn
  widths: tuple[int, ...] = ()    # conv channels per layer, or MLP hidden sizes

  def __post_init__(self):
    if self.stage not in STAGES:
      raise ValueError(f"variant {self.name!r}: stage {self.stage!r}, expected one of {STAGES}")
    kinds = {"denoise": ("identity", "residual_cnn"), "classify": ("linear", "mlp", "cnn")}
    if self.kind not in kinds[self.stage]:
      raise ValueError(f"variant {self.stage}/{self.name}: kind {self.kind!r}, expected one of "
                       f"{kinds[self.stage]}")
    if any(not isinstance(w, int) or w < 1 for w in self.widths):
      raise ValueError(f"variant {self.stage}/{self.name}: widths {self.widths!r}, expected "
                       "positive ints")

  @property
  def key(self) -> str:
    return f"{self.stage}/{self.name}"


# The default catalogue: 4 denoisers (one of them skips the stage) and 4 classifiers.
DEFAULT_VARIANTS: tuple[tuple[VariantSpec, ...], ...] = (
    (VariantSpec("denoise", "identity", "identity"),
     VariantSpec("denoise", "small", "residual_cnn", (8, 8)),
     VariantSpec("denoise", "medium", "residual_cnn", (16, 16, 16)),
     VariantSpec("denoise", "large", "residual_cnn", (32, 32, 32, 32))),
    (VariantSpec("classify", "tiny", "linear"),
     VariantSpec("classify", "small", "mlp", (128,)),
     VariantSpec("classify", "medium", "cnn", (16, 32)),
     VariantSpec("classify", "large", "cnn", (32, 64))),
)


class Frames(NamedTuple):
  """The task's data: clean and noisy images (n, s, s, 1) in [0, 1] (noisy not clipped), labels."""
  clean: np.ndarray
  noisy: np.ndarray
  labels: np.ndarray


def digit_frames(image_size: int, noise_sigma: float, seed: int,
                 test_fraction: float = 0.25) -> tuple[Frames, Frames]:
  """(train, test) of the noisy-digits task: same arguments, same arrays anywhere."""
  from research.common import data  # pylint: disable=import-outside-toplevel
  if image_size < 8 or image_size % 8:
    raise ValueError(f"image_size={image_size!r}: expected a multiple of 8 (the digits are 8x8)")
  if noise_sigma < 0:
    raise ValueError(f"noise_sigma={noise_sigma!r}: expected >= 0")
  split = data.digits(test_fraction=test_fraction, seed=seed)
  rng = np.random.default_rng(seed)

  def make(x, y):
    images = x.reshape(-1, 8, 8)
    # Smooth upsampling (bilinear through jax.image) so the denoisers have structure to keep.
    clean = np.asarray(jax.image.resize(jnp.asarray(images), (len(images), image_size,
                                                               image_size), "bilinear"))
    clean = clean[..., None].astype(np.float32)
    noisy = clean + noise_sigma * rng.standard_normal(clean.shape).astype(np.float32)
    return Frames(clean, noisy.astype(np.float32), y.astype(np.int32))

  return make(split.x_train, split.y_train), make(split.x_test, split.y_test)


class ResidualCNN(nnx.Module):
  """DnCNN-style denoiser: 3x3 convs with ReLU predict the noise; output = input - noise."""

  def __init__(self, widths: Sequence[int], *, rngs: nnx.Rngs):
    channels = (1, *widths)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs)
                           for a, b in zip(channels[:-1], channels[1:])])
    self.out = nnx.Conv(channels[-1], 1, (3, 3), rngs=rngs,
                        kernel_init=nnx.initializers.zeros_init())

  def __call__(self, x):
    h = x
    for conv in self.convs:
      h = nnx.relu(conv(h))
    return x - self.out(h)


class Linear(nnx.Module):
  def __init__(self, image_size: int, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(image_size * image_size, 10, rngs=rngs)

  def __call__(self, x):
    return self.dense(x.reshape(x.shape[0], -1))


class MLPClassifier(nnx.Module):
  def __init__(self, image_size: int, hidden: Sequence[int], *, rngs: nnx.Rngs):
    sizes = (image_size * image_size, *hidden, 10)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    h = x.reshape(x.shape[0], -1)
    for layer in self.layers[:-1]:
      h = nnx.relu(layer(h))
    return self.layers[-1](h)


class CNNClassifier(nnx.Module):
  """3x3 conv + ReLU + 2x2 max pooling per width, then a dense head on the flattened map."""

  def __init__(self, image_size: int, widths: Sequence[int], *, rngs: nnx.Rngs):
    channels = (1, *widths)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs)
                           for a, b in zip(channels[:-1], channels[1:])])
    side = image_size // 2 ** len(widths)
    if side < 1:
      raise ValueError(f"cnn widths {tuple(widths)}: {len(widths)} poolings do not fit "
                       f"image_size={image_size}")
    self.head = nnx.Linear(side * side * channels[-1], 10, rngs=rngs)

  def __call__(self, x):
    h = x
    for conv in self.convs:
      h = nnx.max_pool(nnx.relu(conv(h)), (2, 2), strides=(2, 2))
    return self.head(h.reshape(h.shape[0], -1))


def _module(spec: VariantSpec, image_size: int, rngs: nnx.Rngs) -> nnx.Module:
  return {"residual_cnn": lambda: ResidualCNN(spec.widths, rngs=rngs),
          "linear": lambda: Linear(image_size, rngs=rngs),
          "mlp": lambda: MLPClassifier(image_size, spec.widths, rngs=rngs),
          "cnn": lambda: CNNClassifier(image_size, spec.widths, rngs=rngs)}[spec.kind]()


def _functional(module: nnx.Module) -> tuple[ApplyFn, Params]:
  graphdef, params = nnx.split(module, nnx.Param)

  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  return apply, params


def _identity(params, x):
  del params
  return x


def build(spec: VariantSpec, image_size: int, seed: int) -> tuple[ApplyFn, Params]:
  """The variant's pure apply function and initial params (an empty dict for `identity`)."""
  if spec.kind == "identity":
    return _identity, {}
  return _functional(_module(spec, image_size, nnx.Rngs(seed)))


def abstract(spec: VariantSpec, image_size: int) -> tuple[ApplyFn, Params]:
  """The apply function and the params' shapes (jax.ShapeDtypeStruct leaves), without running
  any initializer: what loading kept params and compiling need."""
  if spec.kind == "identity":
    return _identity, {}
  return _functional(nnx.eval_shape(lambda: _module(spec, image_size, nnx.Rngs(0))))


def param_bytes(params: Params) -> int:
  return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))


def fingerprint(spec: VariantSpec, image_size: int, params: Params) -> str:
  """sha256 over the variant's architecture, the input size and every parameter's bytes."""
  digest = hashlib.sha256(repr((dataclasses.astuple(spec), image_size)).encode())
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                           key=lambda item: jax.tree_util.keystr(item[0])):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


class TrainConfig(NamedTuple):
  steps: int = 400
  batch_size: int = 64
  learning_rate: float = 3e-3


def _fit(loss_fn, params, batches: Callable[[int], tuple], config: TrainConfig):
  """Adam on `loss_fn(params, *batch)` for config.steps steps (batches(step) -> batch)."""
  optimizer = optax.adam(config.learning_rate)

  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  loss = jnp.nan
  for i in range(config.steps):
    params, opt_state, loss = step(params, opt_state, *batches(i))
  return params, float(loss)


def _batches(n: int, config: TrainConfig, seed: int):
  rng = np.random.default_rng(seed)
  order = [rng.permutation(n) for _ in range(config.steps * config.batch_size // n + 1)]
  flat = np.concatenate(order)
  return lambda i: flat[i * config.batch_size:(i + 1) * config.batch_size]


def train_denoiser(spec: VariantSpec, train: Frames, image_size: int, config: TrainConfig,
                   seed: int) -> tuple[Params, float]:
  """Mean squared error to the clean image; returns (params, last loss)."""
  apply, params = build(spec, image_size, seed)
  if spec.kind == "identity":
    return params, float(np.mean((train.noisy - train.clean) ** 2))
  pick = _batches(len(train.labels), config, seed)
  noisy, clean = jnp.asarray(train.noisy), jnp.asarray(train.clean)
  loss_fn = lambda p, x, y: jnp.mean((apply(p, x) - y) ** 2)
  return _fit(loss_fn, params, lambda i: (noisy[pick(i)], clean[pick(i)]), config)


def train_classifier(spec: VariantSpec, images: np.ndarray, labels: np.ndarray, image_size: int,
                     config: TrainConfig, seed: int) -> tuple[Params, float]:
  """Softmax cross-entropy on `images` (the noisy frames through the reference denoiser, so each
  classifier sees the input distribution it will meet); returns (params, last loss)."""
  apply, params = build(spec, image_size, seed)
  pick = _batches(len(labels), config, seed)
  x, y = jnp.asarray(images), jnp.asarray(labels)
  loss_fn = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      apply(p, xb), yb).mean()
  return _fit(loss_fn, params, lambda i: (x[pick(i)], y[pick(i)]), config)
