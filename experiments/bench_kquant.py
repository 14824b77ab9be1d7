"""Throughput of the K-quant kernels against plain jnp baselines run in the same process.

  python experiments/bench_kquant.py               # CPU: the jnp reference path vs baselines
  PYTHONPATH=. python3 experiments/bench_kquant.py --out DIR   # on a GPU: Pallas too

Measured, in GB/s of float32 input:
- encode + pack (K=16, 4 bits, stochastic, counter-hash randomness) of n floats, against a plain
  jnp elementwise pass over the same array (`x * a + b`: one read, one write);
- decode + weighted sum over C clients' packed updates, against the uncompressed aggregate
  (`tensordot(weights, updates)` over C float32 updates: the same result from 8x the bytes).
On a GPU it adds the device's copy bandwidth (`x + 0` on a large array, read + write) and each
kernel's share of it, and checks the Pallas kernels against the reference on the device.
Writes papers/results/bench_kquant.<backend>.json and the table in papers/kquant.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments._timing import median_seconds  # pylint: disable=wrong-import-position
from kernels import kquant as kq  # pylint: disable=wrong-import-position
from research.common import records  # pylint: disable=wrong-import-position

PAPER = Path(__file__).resolve().parent.parent / "papers" / "kquant.md"
BUCKET = 1024


def bench(num_floats: int, clients: int, impls: list[str], repeats: int) -> list[dict]:
  rows = num_floats // BUCKET
  x = jax.random.normal(jax.random.key(0), (rows, BUCKET), jnp.float32)
  lo, hi = jnp.full((rows,), -3.0), jnp.full((rows,), 3.0)
  gigabytes = num_floats * 4 / 1e9
  out = []

  baseline = jax.jit(lambda x: x * 1.5 + 0.5)
  t_base = median_seconds(baseline, x, repeats=repeats)
  out.append(dict(op="elementwise baseline (x*a+b)", impl="jnp", n=num_floats, clients=1,
                  seconds=t_base, gbps=gigabytes / t_base, ratio=1.0))
  for impl in impls:
    encode = jax.jit(functools.partial(kq.encode, k=16, bits=4, stochastic=True, impl=impl))
    t = median_seconds(lambda x: encode(x, lo, hi, seed=jnp.uint32(1)), x, repeats=repeats)
    out.append(dict(op="encode+pack K=16 (4 bits)", impl=impl, n=num_floats, clients=1,
                    seconds=t, gbps=gigabytes / t, ratio=t_base / t))

  packed = jax.random.randint(jax.random.key(1), (clients, rows, BUCKET // 2), 0, 256
                              ).astype(jnp.uint8)
  updates = jax.random.normal(jax.random.key(2), (clients, rows, BUCKET), jnp.float32)
  weights = jnp.full((clients,), 1.0 / clients)
  aggregate = jax.jit(lambda w, u: jnp.tensordot(w, u, axes=1))
  t_agg = median_seconds(aggregate, weights, updates, repeats=repeats)
  all_gb = clients * gigabytes
  out.append(dict(op=f"float32 aggregate ({clients} clients)", impl="jnp", n=num_floats,
                  clients=clients, seconds=t_agg, gbps=all_gb / t_agg, ratio=1.0))
  for impl in impls:
    decode = jax.jit(functools.partial(kq.decode_sum, k=16, bits=4, impl=impl))
    t = median_seconds(decode, packed, weights, lo, hi, repeats=repeats)
    out.append(dict(op=f"decode+aggregate K=16 ({clients} clients)", impl=impl, n=num_floats,
                    clients=clients, seconds=t, gbps=all_gb / t, ratio=t_agg / t))
  return out


def copy_bandwidth(num_floats: int, repeats: int) -> float:
  x = jnp.ones((num_floats,), jnp.float32)
  t = median_seconds(jax.jit(lambda x: x + 0.0), x, repeats=repeats)
  return 2 * num_floats * 4 / 1e9 / t  # read + write


def device_agreement() -> dict:
  """Pallas vs reference on this device: identical encodes, decode differences."""
  x = jax.random.normal(jax.random.key(3), (512, BUCKET)) * 2
  lo, hi = jnp.full((512,), -3.0), jnp.full((512,), 3.0)
  result = {}
  for bits, k in ((1, 2), (2, 4), (4, 16), (8, 256)):
    a = kq.encode(x, lo, hi, k=k, bits=bits, stochastic=True, seed=jnp.uint32(5), impl="pallas")
    b = kq.encode(x, lo, hi, k=k, bits=bits, stochastic=True, seed=jnp.uint32(5),
                  impl="reference")
    packed = jnp.stack([a, b, a])
    d1 = kq.decode_sum(packed, jnp.array([0.2, 0.3, 0.5]), lo, hi, k=k, bits=bits, impl="pallas")
    d2 = kq.decode_sum(packed, jnp.array([0.2, 0.3, 0.5]), lo, hi, k=k, bits=bits,
                       impl="reference")
    result[f"bits={bits}"] = dict(encode_bytes_equal=float(jnp.mean(a == b)),
                                  decode_max_abs_diff=float(jnp.max(jnp.abs(d1 - d2))))
  return result


def table(results: list[dict], device: str) -> str:
  return (f"Device: {device}.\n\n" + records.write_markdown_table(
      ["operation", "impl", "floats", "clients", "ms", "GB/s (float32 in)", "speed vs jnp"],
      [[r["op"], r["impl"], f"{r['n']:,}", r["clients"], f"{1e3 * r['seconds']:.2f}",
        f"{r['gbps']:.2f}", f"{r['ratio']:.2f}x"] for r in results]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", default="1048576,4194304")
  parser.add_argument("--clients", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=str(PAPER.parent / "results"))
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind if backend != "cpu" else f"CPU ({platform.processor() or platform.machine()})"
  # Interpret mode is a debugging path, not a speed: on CPU only the reference runs here.
  impls = ["reference"] if backend == "cpu" else ["pallas", "reference"]
  results = []
  for size in (int(s) for s in args.sizes.split(",")):
    results += bench(size, args.clients, impls, args.repeats)
  summary = {"backend": backend, "device": device, "jax": jax.__version__, "results": results}
  if backend != "cpu":
    bandwidth = copy_bandwidth(max(int(s) for s in args.sizes.split(",")) * 4, args.repeats)
    summary["copy_bandwidth_gbps"] = bandwidth
    for r in results:
      r["share_of_copy_bandwidth"] = r["gbps"] / bandwidth
    summary["pallas_vs_reference"] = device_agreement()
  out = Path(args.out)
  records.atomic_write_json(out / f"bench_kquant.{backend}.json", summary)
  text = table(results, device)
  if backend != "cpu":
    text += f"\nCopy bandwidth (x + 0, read + write): {summary['copy_bandwidth_gbps']:.0f} GB/s.\n"
  records.atomic_write_text(out / f"bench_kquant.{backend}.md", text)
  print(text)
  records.replace_marked_block(PAPER, f"bench_kquant:{backend}", text)
  print(json.dumps(summary.get("pallas_vs_reference", {}), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
