"""Benchmark: the encrypted interaction layer's cost per sample, against the plaintext split and
against FATE 1.x's published Hetero-NN figure.

On the synthetic set of the experiment (20,000 samples), at the table width of FATE's benchmark
by default (30 active + 300 passive features, `--features`), one process runs both parties
(messages encoded and counted as always):

- seconds per training sample of (a) the encrypted protocol and (b) the plaintext split protocol,
  over `--batches` training batches each (after one more that also compiles the jax steps), (a)
  with the Paillier work in this process and over a pool of 2 processes shared by both parties
  (does the pool pay off?), each unpacked and packed (`he.packing`: several fixed-point values
  per Paillier plaintext); the (a) / (b) ratio is the per-epoch time ratio (both are linear in
  the samples of an epoch);
- bytes per training sample of (a) and (b);
- Paillier operations per sample (from the protocol: B batch rows, d_a passive outputs, h
  interaction outputs, K slots when packed; `operations_per_batch`, tested against the counts of
  a run) times their unit costs measured here, against the measured time: the share of the time
  that is Paillier, and which operations dominate;
- seconds per sample-feature against FATE 1.x (347 s per epoch for 100,000 samples with 30 + 300
  features on hosts of 16 cores: the issue's citation of FATE's Hetero-NN benchmark), and the
  time of an epoch of FATE's workload here. The encrypted work does not grow with the number of
  features (only the bottom models do), so per sample-feature favours wide tables: the default
  runs FATE's own width, so that its epoch is the same work as FATE's. FATE 1.x's Paillier key
  is 1024 bits unless configured (`EncryptParam(key_length=1024)` in
  FederatedAI/FATE python/federatedml/param/encrypt_param.py); `--key-bits 1024` is that setting.

  python -m experiments.bench_vfl [--key-bits 2048] [--batches 2] [--features 30,300] [--paper]

Writes runs/bench_vfl/<timestamp>/ (summary.json, tables.md); with --paper also keeps the
summary as papers/results/bench_vfl.cpu.json and fills papers/vfl.md. A timing benchmark: run it
on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

from experiments import paper
from experiments import run as launcher
from experiments import vfl
from research.common import records
from research.vfl import he

PAPER_PAGE = "papers/vfl.md"
FATE = {"seconds_per_epoch": 347.0, "samples": 100_000, "features": 330, "cores_per_host": 16,
        "source": "FATE 1.x Hetero-NN benchmark, as cited by the issue (30 + 300 features)"}
FATE_FEATURES = (30, 300)  # the cited benchmark's width, as (active, passive)


def unit_costs(key_bits: int, count: int = 30) -> dict[str, float]:
  """Median seconds of one Paillier operation at this key size, on values of the protocol's
  sizes (fixed-point ints of about 40 bits)."""
  public_key, private_key = he.generate_keypair(key_bits)
  rng = np.random.default_rng(0)
  values = [int(v) for v in rng.integers(-2**40, 2**40, size=count)]
  timings: dict[str, list[float]] = {k: [] for k in ("encrypt", "obfuscate", "decrypt",
                                                     "multiply", "add")}
  for v in values[:3]:  # warm-up
    private_key.decrypt(public_key.encrypt(v) * v)
  ciphertexts = []
  for v in values:
    start = time.perf_counter()
    c = public_key.encrypt(v)
    timings["encrypt"].append(time.perf_counter() - start)
    ciphertexts.append(c)
  for c, v in zip(ciphertexts, values):
    start = time.perf_counter()
    c2 = c * v
    timings["multiply"].append(time.perf_counter() - start)
    start = time.perf_counter()
    c3 = c2 + c
    timings["add"].append(time.perf_counter() - start)
    start = time.perf_counter()
    c3.obfuscate()
    timings["obfuscate"].append(time.perf_counter() - start)
    start = time.perf_counter()
    private_key.decrypt(c3)
    timings["decrypt"].append(time.perf_counter() - start)
  costs = {k: statistics.median(v) for k, v in timings.items()}
  costs["multiply and sum"] = costs.pop("multiply") + costs.pop("add")
  return costs


class TimedEngine(he.Engine):
  """The in-process engine, counting each Paillier operation and the seconds spent in it."""

  def __init__(self):
    super().__init__()
    object.__setattr__(self, "seconds", {})
    object.__setattr__(self, "counts", {})

  def _timed(self, name: str, count: int, function, *args):
    start = time.perf_counter()
    out = function(*args)
    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
    self.counts[name] = self.counts.get(name, 0) + count
    return out

  def encrypt(self, public_key, ints):
    return self._timed("encrypt", np.size(ints), super().encrypt, public_key, ints)

  def decrypt(self, private_key, ciphertexts):
    return self._timed("decrypt", np.size(ciphertexts), super().decrypt, private_key,
                       ciphertexts)

  def obfuscate(self, ciphertexts):
    return self._timed("obfuscate", np.size(ciphertexts), super().obfuscate, ciphertexts)

  def matmul(self, ciphertexts, matrix):
    count = ciphertexts.shape[0] * int(np.prod(np.shape(matrix)))  # rows x k x m products
    return self._timed("multiply and sum", count, super().matmul, ciphertexts, matrix)

  def matvec(self, matrix, ciphertexts):
    return self._timed("multiply and sum", int(np.prod(np.shape(matrix))), super().matvec,
                       matrix, ciphertexts)

  def matmul_left(self, matrix, ciphertexts):
    return super().matmul_left(matrix, ciphertexts)  # calls matmul: counted there


def operations_per_batch(batch: int, d_a: int, h: int, slots: int = 0,
                         phase: str = "train") -> dict[str, int]:
  """Paillier operations of one batch of the encrypted protocol (parties.py); `slots` > 0: packed
  with that many values per plaintext (G = ceil(batch / slots) groups of samples in the forward,
  slots // d_a samples per plaintext in the backward)."""
  if slots:
    groups = -(-batch // slots)
    per = slots // d_a                  # samples per plaintext in the backward sums
    sample_groups = -(-batch // per)
    forward = {"encrypt": groups * d_a, "obfuscate": groups * h, "decrypt": groups * h,
               "multiply and sum": groups * d_a * h}
    # [a] per group of samples, [e_acc] per (sample slot group, column); [a^T d + delta] per
    # (sample slot group, column), [d W_p^T] per group of samples.
    backward = {"encrypt": sample_groups + per * h, "obfuscate": per * h + sample_groups,
                "decrypt": per * h + sample_groups,
                "multiply and sum": 2 * per * h * sample_groups}
  else:
    forward = {"encrypt": batch * d_a, "obfuscate": batch * h, "decrypt": batch * h,
               "multiply and sum": batch * d_a * h}               # [a]; [aW'+eps]
    backward = {"encrypt": d_a * h, "obfuscate": d_a * h + batch * d_a,  # [e_acc]; [a^T d+delta],
                "decrypt": d_a * h + batch * d_a,                   # [d W_p^T]
                "multiply and sum": 2 * batch * d_a * h}            # d^T[a]; d [W_p]^T
  if phase == "eval":
    return forward
  return {k: forward[k] + backward[k] for k in forward}


def operations_per_sample(batch: int, d_a: int, h: int, slots: int = 0) -> dict[str, float]:
  """Paillier operations per training sample of the encrypted protocol."""
  return {k: v / batch for k, v in operations_per_batch(batch, d_a, h, slots).items()}


def parse_features(text: str) -> tuple[int, int]:
  """'ACTIVE,PASSIVE' -> (active, passive) feature counts of the synthetic set, both >= 1."""
  parts = text.split(",")
  try:
    active, passive = (int(p) for p in parts)
  except ValueError:
    active = passive = 0
  if len(parts) != 2 or active < 1 or passive < 1:
    raise argparse.ArgumentTypeError(
        f"--features: expected ACTIVE,PASSIVE, two positive integers (e.g. 30,300), got {text!r}")
  return active, passive


def measure(key_bits: int, batches: int, batch_size: int, workers: int,
            methods: tuple[str, ...], packing: bool = False,
            features: tuple[int, int] = FATE_FEATURES) -> dict:
  config, _ = launcher.load("configs/vfl/smoke.py", [
      "dataset=synthetic", "epochs=1", f"batch_size={batch_size}",
      f"synthetic_active_features={features[0]}", f"synthetic_passive_features={features[1]}",
      f"max_train_batches={batches + 1}", "max_eval_batches=1", f"methods={methods!r}",
      f"he.key_bits={key_bits}", f"he.workers={workers}", f"he.packing={packing}"])
  tables = vfl.party_tables(config)
  engine = TimedEngine() if workers == 1 else vfl._pool(config)  # pylint: disable=protected-access
  try:
    result = vfl.run_seed(config, launcher.Run(None), tables, config.seed, engine)
  finally:
    if engine.pool is not None:
      engine.pool.shutdown()
  out = {}
  for method, r in result["methods"].items():
    timed = r["train_batches"][1:]  # the first batch also compiles the jax steps
    samples = sum(n for _, n in timed)
    out[method] = {"seconds_per_sample": sum(t for t, _ in timed) / samples,
                   "bytes_per_sample": r["bytes_per_sample"], "train_samples": samples,
                   "setup_seconds": r["setup_seconds"]}
  if isinstance(engine, TimedEngine):  # seconds per operation inside the run (all batches)
    out["unit_seconds_in_run"] = {name: engine.seconds[name] / engine.counts[name]
                                  for name in engine.counts}
  out["psi_seconds"] = result["psi_seconds"]
  out["slots"] = result["methods"].get("encrypted", {}).get("packing_slots", 0)
  out["slot_bits"] = result["methods"].get("encrypted", {}).get("slot_bits", 0)
  out["features"] = int(tables["active"][1].shape[1] + tables["passive"][1].shape[1])
  out["network"] = config.network.to_dict()
  return out


def bench(key_bits: int, batches: int, batch_size: int,
          features: tuple[int, int] = FATE_FEATURES) -> dict:
  costs = unit_costs(key_bits)
  one = measure(key_bits, batches, batch_size, 1, ("encrypted", "plaintext"), features=features)
  two = measure(key_bits, batches, batch_size, 2, ("encrypted",), features=features)
  packed_one = measure(key_bits, batches, batch_size, 1, ("encrypted",), packing=True,
                       features=features)
  packed_two = measure(key_bits, batches, batch_size, 2, ("encrypted",), packing=True,
                       features=features)
  d_a, h = one["network"]["passive_out"], one["network"]["interaction_out"]
  slots = packed_one["slots"]
  ops = operations_per_sample(batch_size, d_a, h)
  packed_ops = operations_per_sample(batch_size, d_a, h, slots)
  in_run = one["unit_seconds_in_run"]
  packed_in_run = packed_one["unit_seconds_in_run"]
  paillier_seconds = {k: ops[k] * in_run[k] for k in ops}
  packed_paillier_seconds = {k: packed_ops[k] * packed_in_run[k] for k in packed_ops}
  encrypted = one["encrypted"]["seconds_per_sample"]
  packed = packed_one["encrypted"]["seconds_per_sample"]
  seconds = {"workers_1": encrypted, "workers_2": two["encrypted"]["seconds_per_sample"],
             "packed_workers_1": packed,
             "packed_workers_2": packed_two["encrypted"]["seconds_per_sample"]}
  fastest = min(seconds.values())
  width = one["features"]
  fate_per_sample_feature = FATE["seconds_per_epoch"] / (FATE["samples"] * FATE["features"])
  return {
      "key_bits": key_bits, "batches": batches, "batch_size": batch_size,
      "unit_seconds": costs, "unit_seconds_in_run": in_run, "operations_per_sample": ops,
      "paillier_seconds_per_sample": paillier_seconds,
      "paillier_share": sum(paillier_seconds.values()) / encrypted,
      "slots": slots, "slot_bits": packed_one["slot_bits"],
      "packed_operations_per_sample": packed_ops, "packed_unit_seconds_in_run": packed_in_run,
      "packed_paillier_seconds_per_sample": packed_paillier_seconds,
      "packed_paillier_share": sum(packed_paillier_seconds.values()) / packed,
      "encrypted_seconds_per_sample": seconds,
      "fastest": min(seconds, key=seconds.get),
      "pool_speedup": encrypted / two["encrypted"]["seconds_per_sample"],
      "packing_speedup": encrypted / packed,
      "plaintext_seconds_per_sample": one["plaintext"]["seconds_per_sample"],
      "encrypted_over_plaintext": fastest / one["plaintext"]["seconds_per_sample"],
      "bytes_per_sample": {"encrypted": one["encrypted"]["bytes_per_sample"],
                           "packed": packed_one["encrypted"]["bytes_per_sample"],
                           "plaintext": one["plaintext"]["bytes_per_sample"]},
      "features": width, "active_passive_features": list(features),
      "seconds_per_sample_feature": fastest / width,
      "fate": dict(FATE, seconds_per_sample_feature=fate_per_sample_feature),
      "over_fate_per_sample_feature": fastest / width / fate_per_sample_feature,
      "fate_epoch_projected_seconds": fastest * FATE["samples"],
      "psi_seconds_20k": one["psi_seconds"],
      "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                  "processor": platform.processor() or "unknown"},
  }


def paper_tables(*results: dict) -> dict[str, str]:
  """The page's tables: those of one run from the first result, and `fate_runs`, the FATE
  comparison of every result given (a block key ending in '*' names several runs)."""
  return {**_run_tables(results[0]), "fate_runs": _fate_runs(results)}


def _fate_runs(results) -> str:
  rows, ratios = [], []
  for result in results:
    s = result["summary"]
    split = s["active_passive_features"]
    ratios.append(s["over_fate_per_sample_feature"])
    rows.append((f"`{result['key']}`", f"{s['key_bits']}", f"{split[0]} + {split[1]}",
                 f"{s['fate_epoch_projected_seconds']:.0f}", f"{ratios[-1]:.2f}x"))
  return (records.write_markdown_table(
      ("kept run", "key bits", "features (active + passive)",
       f"s / epoch of {FATE['samples']:,} samples", "meshwork / FATE per sample-feature"), rows)
      + f"\nOver {len(rows)} run(s): {min(ratios):.2f}x ... {max(ratios):.2f}x.\n")


def _run_tables(result: dict) -> dict[str, str]:
  s = result["summary"]
  machine = f"{s['machine']['cpu_count']} cores ({s['machine']['machine']})"
  rows = [("(a) encrypted, Paillier in process", f"{s['encrypted_seconds_per_sample']['workers_1']:.4f}",
           f"{s['bytes_per_sample']['encrypted']:,.0f}"),
          ("(a) encrypted, pool of 2 processes", f"{s['encrypted_seconds_per_sample']['workers_2']:.4f}",
           ""),
          (f"(a) encrypted, packed ({s['slots']} slots of {s['slot_bits']} bits), in process",
           f"{s['encrypted_seconds_per_sample']['packed_workers_1']:.4f}",
           f"{s['bytes_per_sample']['packed']:,.0f}"),
          ("(a) encrypted, packed, pool of 2 processes",
           f"{s['encrypted_seconds_per_sample']['packed_workers_2']:.4f}", ""),
          ("(b) plaintext split", f"{s['plaintext_seconds_per_sample']:.6f}",
           f"{s['bytes_per_sample']['plaintext']:,.0f}")]
  active, passive = s["active_passive_features"]
  cost = (f"Synthetic set, {active} active + {passive} passive features, {s['key_bits']}-bit keys, "
          f"{s['batches']} batches of {s['batch_size']}; {machine}.\n\n"
          + records.write_markdown_table(("method", "s / training sample", "bytes / sample"), rows)
          + f"\n(a) / (b) per epoch (the fastest (a)): {s['encrypted_over_plaintext']:,.0f}x; "
          f"the pool of 2 processes: {s['pool_speedup']:.2f}x faster than in process; packing: "
          f"{s['packing_speedup']:.2f}x faster than unpacked (both in process).\n")
  ops, packed = s["operations_per_sample"], s["packed_operations_per_sample"]
  op_rows = [(name, f"{ops[name]:.2f}", f"{s['unit_seconds_in_run'][name] * 1e3:.3f}",
              f"{s['unit_seconds'][name] * 1e3:.3f}",
              f"{s['paillier_seconds_per_sample'][name]:.4f}", f"{packed[name]:.2f}",
              f"{s['packed_unit_seconds_in_run'][name] * 1e3:.3f}",
              f"{s['packed_paillier_seconds_per_sample'][name]:.4f}") for name in ops]
  paillier = (records.write_markdown_table(
      ("Paillier operation", "per training sample", "ms each (in the run)",
       "ms each (alone)", "s per training sample", "packed: per training sample",
       "packed: ms each (in the run)", "packed: s per training sample"), op_rows)
      + f"\nThese operations take {s['paillier_share']:.0%} of the in-process encrypted time per "
      f"training sample unpacked, {s['packed_paillier_share']:.0%} packed (the rest: jax steps, "
      "fixed-point encoding and packing, messages).\n")
  fate = s["fate"]
  cores = s["machine"]["cpu_count"]
  best = {"workers_1": "in process", "workers_2": "pool of 2", "packed_workers_1":
          "packed, in process", "packed_workers_2": "packed, pool of 2"}[s["fastest"]]
  fate_rows = [("FATE 1.x (cited)", f"{fate['cores_per_host']} cores / host",
                f"{fate['seconds_per_sample_feature']:.3g}", f"{fate['seconds_per_epoch']:.0f}",
                f"{fate['seconds_per_epoch'] * fate['cores_per_host']:,.0f}"),
               (f"meshwork (a), {s['key_bits']}-bit keys, {best}", machine,
                f"{s['seconds_per_sample_feature']:.3g}",
                f"{s['fate_epoch_projected_seconds']:.0f}",
                f"{s['fate_epoch_projected_seconds'] * cores:,.0f}")]
  versus = (records.write_markdown_table(
      ("system", "machine", "s / sample-feature", f"s / epoch of {fate['samples']:,} samples",
       "core-s / epoch"), fate_rows)
      + f"\nmeshwork / FATE per sample-feature: {s['over_fate_per_sample_feature']:.1f}x "
      f"({'goal met' if s['over_fate_per_sample_feature'] < 1 else 'goal not met'}: "
      "faster per sample-feature).\n")
  return {"cost": cost, "paillier": paillier, "fate": versus}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_vfl", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--key-bits", type=int, default=2048)
  parser.add_argument("--batches", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--features", type=parse_features, default=FATE_FEATURES,
                      metavar="ACTIVE,PASSIVE",
                      help="the synthetic set's feature counts (default: FATE's 30,300)")
  paper.add_paper_argument(parser, default_key="bench_vfl.cpu")
  args = parser.parse_args(argv)
  summary = bench(args.key_bits, args.batches, args.batch_size, args.features)
  for name, text in paper_tables({"summary": records.to_jsonable(summary)}).items():
    print(f"## {name}\n\n{text}")
  paper.finish_benchmark("bench_vfl", PAPER_PAGE, summary, args.paper,
                         sys.argv[1:] if argv is None else argv)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
