"""A tiny catalogue (8x8 images, untrained variants) shared by the edge tests."""

import math

import jax

from research.edge import pipeline
from research.edge import variants
from research.edge.selector import VariantProfile

SIZE = 8
CATALOGUE = (
    (variants.VariantSpec("denoise", "identity", "identity"),
     variants.VariantSpec("denoise", "small", "residual_cnn", (2,))),
    (variants.VariantSpec("classify", "tiny", "linear"),
     variants.VariantSpec("classify", "small", "mlp", (8,)),
     variants.VariantSpec("classify", "large", "cnn", (4,))),
)
# Profiles chosen so that at a 10 ms budget the idle choice is small+large (3 + 5 ms) and under
# full load identity+small (0.2 + 8 ms).
PROFILES = (
    (VariantProfile("denoise", "identity", 0.1, 0.2, 0.1, 0.2, 1.0, 0.1, math.log(0.95)),
     VariantProfile("denoise", "small", 2.0, 3.0, 2.0, 9.0, 1.0, 1.0, 0.0)),
    (VariantProfile("classify", "tiny", 0.5, 1.0, 0.5, 2.0, 1.0, 0.1, math.log(0.80)),
     VariantProfile("classify", "small", 1.0, 2.0, 1.0, 8.0, 1.0, 0.5, math.log(0.85)),
     VariantProfile("classify", "large", 4.0, 5.0, 4.0, 20.0, 1.0, 1.0, math.log(0.90))),
)


def params():
  return {spec.key: variants.build(spec, SIZE, seed=i)[1]
          for i, spec in enumerate(s for stage in CATALOGUE for s in stage)}


def compiled():
  return pipeline.compile_variants(CATALOGUE, params(), SIZE)


def frame(n=4):
  return jax.random.uniform(jax.random.key(0), (n, SIZE, SIZE, 1))


class TickClock:
  """A clock that advances `step` seconds per reading."""

  def __init__(self, step=0.001):
    self.now, self.step = 0.0, step

  def __call__(self):
    self.now += self.step
    return self.now
