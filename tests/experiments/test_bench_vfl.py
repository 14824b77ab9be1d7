"""bench_vfl's Paillier operation counts: the formulas its tables multiply by unit costs are the
operations the protocol performs, packed and unpacked (counted by the benchmark's engine)."""

import pytest

from experiments import bench_vfl
from experiments import run as launcher
from experiments import vfl
from research.vfl import model as model_lib


@pytest.mark.parametrize("packing", [False, True])
def test_operation_counts_are_what_the_protocol_performs(packing):
  config, _ = launcher.load("configs/vfl/smoke.py", [
      "methods=('encrypted',)", "he.workers=1", f"he.packing={packing}", "batch_size=24"])
  tables = vfl.party_tables(config)
  engine = bench_vfl.TimedEngine()
  result = vfl.run_seed(config, launcher.Run(None), tables, config.seed, engine)
  encrypted = result["methods"]["encrypted"]
  slots = encrypted.get("packing_slots", 0)
  assert (slots > 0) == packing
  spec = vfl.network_spec(config, tables)
  protocol = vfl.make_protocol(config, spec, model_lib.build(spec, config.seed)[0],
                               result["aligned_samples"], config.seed)
  expected = {}
  for batch in protocol.schedule:
    for name, count in bench_vfl.operations_per_batch(
        len(batch.rows), spec.passive_out, spec.interaction_out, slots, batch.phase).items():
      expected[name] = expected.get(name, 0) + count
  assert engine.counts == expected
  # 2 train batches of 24 and 1 eval batch; packed, 1024-bit keys hold 7 slots: 4 groups.
  assert [b.phase for b in protocol.schedule] == ["train", "train", "eval"]
  if packing:
    assert slots == 7 and expected["encrypt"] == 2 * (4 * 4 + 24 + 4) + 4 * 4
