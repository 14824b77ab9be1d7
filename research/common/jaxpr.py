"""Reading programs: the largest array a jaxpr (with its sub-jaxprs) produces."""

from __future__ import annotations

import numpy as np


def largest_intermediate(jaxpr) -> int:
  """Elements of the largest array any equation of `jaxpr` or of a sub-jaxpr (loop bodies,
  branches, custom-vjp rules, Pallas kernels) produces."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr or a Jaxpr
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          largest = max(largest, largest_intermediate(inner))
  return largest
