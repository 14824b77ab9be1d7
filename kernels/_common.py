"""What every kernel file shares besides shapes: the `impl=` choice and the interpret default.

Each public kernel function takes `impl="pallas" | "reference"` (the Pallas kernel, or the
plain-jnp reference placed last in its file) and `interpret=None`, which runs the Pallas
interpreter on CPU (there is no Pallas compiler for it) and compiles elsewhere.
"""

from __future__ import annotations

import jax

IMPLS = ("pallas", "reference")


def check_impl(impl: str) -> str:
  """`impl` if it is one of IMPLS; a ValueError naming the choices otherwise."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected 'pallas' or 'reference'")
  return impl


def resolve_interpret(interpret: bool | None) -> bool:
  """`interpret`, or when None: True on the CPU backend (interpreter), False elsewhere."""
  return jax.default_backend() == "cpu" if interpret is None else bool(interpret)
