"""Two-stage non-local denoiser and its baselines (flax nnx, used functionally).

(a) `TwoStage`: the input is downscaled by `factor` (average pooling); a first CNN with a
    non-local block runs on the small image and produces the global parameters: a low-resolution
    feature map (the keys and values of the second stage's non-local operation) and a per-channel
    modulation (FiLM scale and shift from its pooled features). The second CNN runs on the full
    image; its non-local block takes queries from every full-resolution position and attends to
    the low-resolution keys/values, O(N * N / s^2) instead of O(N^2), and its features are
    modulated per channel. It predicts the noise (residual learning, as DnCNN), output = input -
    noise.
(b) `Plain`: the same convolutional trunk without non-local operations or the first stage,
    widened to about the same parameter count.
(c) `FullNonLocal`: the trunk with a full-resolution non-local block (self-attention over all N
    positions, O(N^2)).

Images are NHWC float32. `impl` picks the attention: "reference" (jnp, materializes the scores;
used for training on CPU, where the Pallas interpreter walks the kernel's grid step by step),
"pallas" (kernels/nonlocal_attention.py, O(N) memory; interpret mode on CPU; Triton on GPU,
Mosaic on TPU) or "auto" (the kernel on GPU / TPU, the reference on CPU: kernels/_common.py
select_impl), the `impl=` of `nonlocal_attention`. Both compute the same function
(tests/kernels).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import _common as kernels_common
from kernels import nonlocal_attention as attention_kernel

Params = Any
IMPLS = kernels_common.IMPLS  # the attention's `impl` choices
MODELS = ("two_stage", "two_stage_kv", "two_stage_film", "plain", "full_nonlocal")
# What stage one's global parameters drive in stage two (the ablation of (a)): the keys / values
# of the cross non-local block, the FiLM scale / shift, or both. two_stage is "both".
GLOBAL_MODES = {"two_stage": "both", "two_stage_kv": "kv", "two_stage_film": "film"}


def check_image(x: jax.Array, channels: int, factor: int = 1) -> None:
  """Shape rules (static; NaNs are checked by `denoise`, outside jit)."""
  if x.ndim != 4:
    raise ValueError(f"image batch: got shape {x.shape}, expected (B, H, W, C)")
  if x.shape[-1] != channels:
    raise ValueError(f"image batch: got {x.shape[-1]} channels, expected {channels}")
  h, w = x.shape[1:3]
  if h < factor or w < factor:
    raise ValueError(f"image of {h}x{w} is smaller than the downscale factor {factor}")
  if h % factor or w % factor:
    raise ValueError(f"image of {h}x{w} is not divisible by the downscale factor {factor} "
                     "(`denoise` pads by reflection; the model itself does not)")


def downscale(x: jax.Array, factor: int) -> jax.Array:
  """Average pooling by `factor` in height and width."""
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> jax.Array:
  return attention_kernel.nonlocal_attention(q, k, v, impl=impl)


class NonLocal(nnx.Module):
  """Embedded-Gaussian non-local block: x + W softmax(theta(x) phi(c)^T / sqrt(C)) g(c), with
  c = context or x and C = `inner`, the embedding width (the 1/sqrt(C) logit scale is
  nonlocal_attention's default).

  W starts at zero, so the block starts as the identity (Wang et al. zero-initialize the last
  BatchNorm's scale for the same reason).
  """

  def __init__(self, features: int, inner: int, impl: str, *, rngs: nnx.Rngs):
    self.theta = nnx.Linear(features, inner, rngs=rngs)
    self.phi = nnx.Linear(features, inner, rngs=rngs)
    self.g = nnx.Linear(features, inner, rngs=rngs)
    self.out = nnx.Linear(inner, features, kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.impl = impl

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    b, h, w, _ = x.shape
    q = self.theta(x).reshape(b, h * w, -1)
    k = self.phi(context).reshape(b, -1, q.shape[-1])
    v = self.g(context).reshape(b, -1, q.shape[-1])
    return x + self.out(attend(q, k, v, self.impl)).reshape(x.shape)


def _conv(a: int, b: int, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(a, b, kernel_size=(3, 3), padding="SAME", rngs=rngs)


class Trunk(nnx.Module):
  """head conv -> `before` convs -> [mid] -> `after` convs -> tail conv (predicts the noise)."""

  def __init__(self, channels: int, features: int, before: int, after: int, *,
               rngs: nnx.Rngs):
    self.head = _conv(channels, features, rngs)
    self.before = nnx.List([_conv(features, features, rngs) for _ in range(before)])
    self.after = nnx.List([_conv(features, features, rngs) for _ in range(after)])
    self.tail = _conv(features, channels, rngs)

  def __call__(self, x: jax.Array, mid: Callable[[jax.Array], jax.Array] | None = None
               ) -> jax.Array:
    h = nnx.relu(self.head(x))
    for conv in self.before:
      h = nnx.relu(conv(h))
    if mid is not None:
      h = mid(h)
    for conv in self.after:
      h = nnx.relu(conv(h))
    return x - self.tail(h)


class GlobalNet(nnx.Module):
  """Stage one on the downscaled image: conv features, a non-local block, FiLM parameters."""

  def __init__(self, channels: int, features: int, depth: int, factor: int, impl: str, *,
               film: bool = True, rngs: nnx.Rngs):
    self.factor = factor
    self.head = _conv(channels, features, rngs)
    self.convs = nnx.List([_conv(features, features, rngs) for _ in range(depth)])
    self.nonlocal_block = NonLocal(features, max(features // 2, 1), impl, rngs=rngs)
    self.film = (nnx.Linear(features, 2 * features, kernel_init=nnx.initializers.zeros,
                            rngs=rngs) if film else None)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(low-resolution feature map, FiLM scale, FiLM shift); no FiLM: (map, None, None)."""
    h = nnx.relu(self.head(downscale(x, self.factor)))
    for conv in self.convs:
      h = nnx.relu(conv(h))
    h = self.nonlocal_block(h)
    if self.film is None:
      return h, None, None
    scale, shift = jnp.split(self.film(h.mean(axis=(1, 2))), 2, axis=-1)
    return h, scale, shift


class TwoStage(nnx.Module):
  """(a): global parameters from the downscaled image drive the full-resolution non-local CNN.

  global_mode: "both" (the model), or for the ablation "kv" (the low-resolution map is the cross
    block's keys / values, no FiLM) or "film" (FiLM only; no cross block, so stage one reaches
    stage two through the per-channel scale and shift alone).
  """

  def __init__(self, channels: int = 1, features: int = 32, depth: int = 6, factor: int = 4,
               global_depth: int = 2, impl: str = "reference", global_mode: str = "both", *,
               rngs: nnx.Rngs):
    if global_mode not in GLOBAL_MODES.values():
      raise ValueError(f"global_mode: got {global_mode!r}, expected one of "
                       f"{tuple(GLOBAL_MODES.values())}")
    self.channels, self.factor = channels, factor
    self.stage_one = GlobalNet(channels, features, global_depth, factor, impl,
                               film=global_mode != "kv", rngs=rngs)
    self.trunk = Trunk(channels, features, depth // 2, depth - depth // 2, rngs=rngs)
    self.cross = (NonLocal(features, max(features // 2, 1), impl, rngs=rngs)
                  if global_mode != "film" else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_image(x, self.channels, self.factor)
    context, scale, shift = self.stage_one(x)

    def mid(h):
      if self.cross is not None:
        h = self.cross(h, context)  # full-resolution queries, low-resolution keys / values
      if scale is not None:
        h = h * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
      return h

    return self.trunk(x, mid)


class Plain(nnx.Module):
  """(b): the convolutional trunk alone."""

  def __init__(self, channels: int = 1, features: int = 32, depth: int = 6, *,
               rngs: nnx.Rngs):
    self.channels, self.factor = channels, 1
    self.trunk = Trunk(channels, features, depth // 2, depth - depth // 2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_image(x, self.channels)
    return self.trunk(x)


class FullNonLocal(nnx.Module):
  """(c): the trunk with a full-resolution non-local block in the middle, O(N^2)."""

  def __init__(self, channels: int = 1, features: int = 32, depth: int = 6,
               impl: str = "reference", *, rngs: nnx.Rngs):
    self.channels, self.factor = channels, 1
    self.trunk = Trunk(channels, features, depth // 2, depth - depth // 2, rngs=rngs)
    self.nonlocal_block = NonLocal(features, max(features // 2, 1), impl, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_image(x, self.channels)
    return self.trunk(x, self.nonlocal_block)


def param_count(params: Params) -> int:
  """Number of parameters (of arrays or of `build(..., abstract=True)` shapes)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def build(kind: str, seed: int, *, abstract: bool = False, **kwargs
          ) -> tuple[Callable, Params, nnx.Module]:
  """(apply(params, x), params, module) for `kind` in MODELS.

  abstract: params (and module) as shapes only (`jax.ShapeDtypeStruct`), nothing initialized or
    compiled: for counting parameters or for loading saved ones.
  """
  classes = {**dict.fromkeys(GLOBAL_MODES, TwoStage), "plain": Plain,
             "full_nonlocal": FullNonLocal}
  if kind not in classes:
    raise ValueError(f"model {kind!r}: expected one of {MODELS}")
  # Stage-one settings mean nothing to the one-stage models; (b) has no attention at all.
  drop = {"plain": ("factor", "global_depth", "impl"),
          "full_nonlocal": ("factor", "global_depth")}.get(kind, ())
  kwargs = {k: v for k, v in kwargs.items() if k not in drop}
  if kind in GLOBAL_MODES:
    kwargs["global_mode"] = GLOBAL_MODES[kind]
  make = lambda: classes[kind](rngs=nnx.Rngs(seed), **kwargs)
  module = nnx.eval_shape(make) if abstract else make()
  graphdef, params = nnx.split(module, nnx.Param)

  def apply(params: Params, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(x)

  return apply, params, module


def equal_size(kind: str, **sizes) -> dict:
  """`build`'s sizes for `kind`, with (b)'s trunk widened to the two-stage model's parameter
  count (the equal-size baseline); the other models keep `sizes` (which must name `channels` and
  `depth`)."""
  if kind != "plain":
    return dict(sizes)
  target = param_count(build("two_stage", 0, abstract=True, **sizes)[1])
  return {**sizes, "features": plain_features_matching(target, sizes["channels"], sizes["depth"])}


def plain_features_matching(target_params: int, channels: int, depth: int) -> int:
  """The trunk width whose parameter count comes closest to `target_params` (for (b))."""
  def count(f):
    return (9 * channels * f + f) + depth * (9 * f * f + f) + (9 * f * channels + channels)
  return min(range(1, 512), key=lambda f: abs(count(f) - target_params))


def psnr(clean, estimate) -> float:
  """Peak signal-to-noise ratio in dB for images in [0, 1] (estimate clipped to [0, 1]); inf for
  an exact estimate."""
  mse = float(np.mean((np.clip(estimate, 0.0, 1.0) - clean) ** 2))
  return float("inf") if mse == 0.0 else 10.0 * np.log10(1.0 / mse)


def pad_to_multiple(image, factor: int):
  """Reflect-pads (H, W, C) so H and W are multiples of `factor`; returns (padded, (H, W))."""
  h, w = image.shape[:2]
  ph, pw = (-h) % factor, (-w) % factor
  if ph or pw:
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
  return image, (h, w)


def denoise(apply: Callable, params: Params, image, factor: int, channels: int):
  """Denoises one (H, W, C) image in [0, 1]: refuses NaNs, pads by reflection to a multiple of
  the downscale factor, crops back."""
  image = np.asarray(image, np.float32)
  if image.ndim != 3 or image.shape[-1] != channels:
    raise ValueError(f"image: got shape {image.shape}, expected (H, W, {channels})")
  if not np.all(np.isfinite(image)):
    raise ValueError(f"image: {int(np.sum(~np.isfinite(image)))} pixels are NaN or inf")
  if min(image.shape[:2]) < factor:
    raise ValueError(f"image of {image.shape[0]}x{image.shape[1]} is smaller than the "
                     f"downscale factor {factor}")
  padded, (h, w) = pad_to_multiple(image, factor)
  out = apply(params, jnp.asarray(padded)[None])
  return np.asarray(out[0, :h, :w])

