"""Throughput of the K-quant kernels against plain jnp baselines run in the same process.

  python -m experiments.bench_kquant [--paper]                     # CPU: the jnp reference path
  python -m experiments.bench_kquant --sizes 4194304,33554432 --clients 64 [--paper]   # on a GPU

Measured, in GB/s of float32 input:
- encode + pack (K=16, 4 bits, stochastic, counter-hash randomness) of n floats, against a plain
  jnp elementwise pass over the same array (`x * a + b`: one read, one write);
- decode + weighted sum over C clients' packed updates, against the uncompressed aggregate
  (`tensordot(weights, updates)` over C float32 updates: the same result from 8x the bytes).
On a GPU it adds the device's copy bandwidth (`x + 0` on a large array, read + write) and each
kernel's share of it, and checks the Pallas kernels against the reference on the device.
Writes runs/bench_kquant/<timestamp>/ (summary.json, tables.md); with --paper also keeps the
summary as papers/results/bench_kquant.<backend>.json and fills the blocks of papers/kquant.md.
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys

import jax
import jax.numpy as jnp

from experiments import paper
from experiments._timing import median_seconds
from kernels import kquant as kq
from research.common import records

PAPER_PAGE = "papers/kquant.md"
BUCKET = 1024
DECODE_OP = "decode+aggregate K=16"
ENCODE_OP = "encode+pack K=16 (4 bits)"


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
    out.append(dict(op=ENCODE_OP, impl=impl, n=num_floats, clients=1,
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
    out.append(dict(op=f"{DECODE_OP} ({clients} clients)", impl=impl, n=num_floats,
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


def _find(results: list[dict], op: str, impl: str, n: int) -> dict | None:
  return next((r for r in results if r["op"].startswith(op) and r["impl"] == impl and
               r["n"] == n), None)


def paper_tables(result: dict) -> dict[str, str]:
  """The page's tables from a kept result (`result["summary"]` is what `main` measured):
  `throughput` always; on a GPU also `pallas` (the Pallas kernels against their baselines) and
  `agreement` (Pallas vs reference on the device)."""
  summary = result["summary"]
  results = summary["results"]
  throughput = (f"Device: {summary['device']}, jax {summary['jax']}.\n\n"
                + records.write_markdown_table(
                    ["operation", "impl", "floats", "clients", "ms", "GB/s (float32 in)",
                     "speed vs jnp"],
                    [[r["op"], r["impl"], f"{r['n']:,}", r["clients"],
                      f"{1e3 * r['seconds']:.2f}", f"{r['gbps']:.2f}", f"{r['ratio']:.2f}x"]
                     for r in results]))
  tables = {"throughput": throughput}
  bandwidth = summary.get("copy_bandwidth_gbps")
  if bandwidth is not None:
    tables["throughput"] += f"\nCopy bandwidth (x + 0, read + write): {bandwidth:.0f} GB/s.\n"
  sizes = sorted({r["n"] for r in results if r["impl"] == "pallas"})
  if sizes:
    rows = []
    for n in sizes:
      decode, decode_ref = _find(results, DECODE_OP, "pallas", n), _find(results, DECODE_OP,
                                                                          "reference", n)
      encode, encode_ref = _find(results, ENCODE_OP, "pallas", n), _find(results, ENCODE_OP,
                                                                          "reference", n)
      # The packed 4-bit updates the fused decode reads: one eighth of the float32 bytes.
      packed_gbps = decode["gbps"] / 8
      rows.append([f"{n:,}", decode["clients"], f"{decode['ratio']:.1f}x",
                   f"{decode_ref['seconds'] / decode['seconds']:.1f}x",
                   f"{packed_gbps:,.0f}",
                   f"{100 * packed_gbps / bandwidth:.0f} %" if bandwidth else "-",
                   f"{encode['gbps']:.0f}", f"{encode_ref['gbps']:.0f}"])
    tables["pallas"] = records.write_markdown_table(
        ["floats", "clients", "decode+aggregate vs float32 aggregate",
         "decode+aggregate vs jnp reference", "packed GB/s read by decode+aggregate",
         "share of copy bandwidth", "encode GB/s (Pallas)", "encode GB/s (jnp reference)"],
        rows)
  agreement = summary.get("pallas_vs_reference")
  if agreement:
    tables["agreement"] = records.write_markdown_table(
        ["bits", "encode bytes equal (fraction)", "decode+aggregate max abs difference"],
        [[name.split("=")[1], f"{a['encode_bytes_equal']:g}", f"{a['decode_max_abs_diff']:g}"]
         for name, a in sorted(agreement.items(), key=lambda item: int(item[0].split("=")[1]))])
  return tables


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_kquant",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="1048576,4194304")
  parser.add_argument("--clients", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  backend = jax.default_backend()
  paper.add_paper_argument(parser, default_key=f"bench_kquant.{backend}")
  args = parser.parse_args(argv)
  device = (jax.devices()[0].device_kind if backend != "cpu"
            else f"CPU ({platform.processor() or platform.machine()})")
  # Interpret mode is a debugging path, not a speed: on CPU only the reference runs here.
  impls = ["reference"] if backend == "cpu" else ["pallas", "reference"]
  sizes = [int(s) for s in args.sizes.split(",")]
  results = []
  for size in sizes:
    results += bench(size, args.clients, impls, args.repeats)
  summary = {"backend": backend, "device": device, "jax": jax.__version__, "results": results}
  if backend != "cpu":
    bandwidth = copy_bandwidth(max(sizes) * 4, args.repeats)
    summary["copy_bandwidth_gbps"] = bandwidth
    for r in results:
      r["share_of_copy_bandwidth"] = r["gbps"] / bandwidth
    summary["pallas_vs_reference"] = device_agreement()
  run_dir = paper.finish_benchmark("bench_kquant", PAPER_PAGE, summary, args.paper,
                                   sys.argv[1:] if argv is None else argv)
  print((run_dir / "tables.md").read_text(encoding="utf-8"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
