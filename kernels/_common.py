"""What every kernel file shares besides shapes: the `impl=` choice, the interpret default, and
the Pallas compiler a call lowers with.

Each public kernel function takes `impl="auto" | "pallas" | "reference"` (the Pallas kernel, or
the plain-jnp reference placed last in its file; "auto" picks by backend in `select_impl`, the
one place that choice is made) and `interpret=None`, which runs the Pallas interpreter on CPU
(there is no Pallas compiler for it) and compiles elsewhere.

Pallas compilers: Triton on GPU and Mosaic on TPU take different compiler parameters and block
rules (Triton: power-of-two block dimensions; TPU: the last two block dimensions multiples of
(8, 128), or of (32, 128) for 8-bit arrays, or the whole array dimension). A kernel file builds
its `pallas_call` once per target ("gpu" or "tpu") from one kernel body and `per_target` picks
the build for the platform the computation is lowered for (`jax.lax.platform_dependent`), so
one jitted function runs on either. Lowering for several platforms at once (`jax.export` with
`platforms=["cuda", "tpu"]`) is not supported: jax lowers every branch for every platform and
a Pallas call's compiler parameters fit one; export for one platform at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

IMPLS = ("auto", "pallas", "reference")
TARGETS = ("gpu", "tpu")  # Pallas compilers: Triton on GPU, Mosaic on TPU


def select_impl(impl: str = "auto") -> str:
  """"pallas" or "reference": `impl` itself, or for "auto" the Pallas kernel where a Pallas
  compiler exists (GPU, TPU) and the plain-jnp reference on CPU (where the kernel only runs in
  the interpreter). A ValueError names the choices for anything else."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected 'auto', 'pallas' or 'reference'")
  if impl == "auto":
    return "reference" if jax.default_backend() == "cpu" else "pallas"
  return impl


def resolve_interpret(interpret: bool | None) -> bool:
  """`interpret`, or when None: True on the CPU backend (interpreter), False elsewhere."""
  return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def check_target(target: str) -> str:
  if target not in TARGETS:
    raise ValueError(f"target={target!r}: expected 'gpu' (Triton) or 'tpu' (Mosaic)")
  return target


def per_target(build: Callable[[str], Callable[..., Any]], *operands: Any, interpret: bool,
               target: str | None) -> Any:
  """`build(t)(*operands)` for the Pallas target `t` the call lowers with.

  `target` given: that one (tests run the TPU blocks in the interpreter with target="tpu").
  Interpreting with no target: "gpu"'s blocks. Compiling: "tpu" when the computation is
  lowered for TPU, "gpu" otherwise (`jax.lax.platform_dependent`; the other branch is traced
  but not lowered).
  """
  if target is not None:
    return build(check_target(target))(*operands)
  if interpret:
    return build("gpu")(*operands)
  return jax.lax.platform_dependent(*operands, tpu=build("tpu"), default=build("gpu"))
