"""bench_vfl's Paillier operation counts: the formulas its tables multiply by unit costs are the
operations the protocol performs, packed and unpacked (counted by the benchmark's engine); its
--features option."""

import argparse

import pytest

from experiments import bench_vfl
from experiments import run as launcher
from experiments import vfl
from research.vfl import model as model_lib


@pytest.mark.parametrize("packing, mask_bits", [(False, 128), (True, 128), (True, 64)])
def test_operation_counts_are_what_the_protocol_performs(packing, mask_bits):
  # 1024-bit keys; packed with 128-bit masks: 7 slots, 1 sample per backward plaintext; with
  # 64-bit masks: 10 slots, 2.
  config, _ = launcher.load("configs/vfl/smoke.py", [
      "methods=('encrypted',)", "he.workers=1", f"he.packing={packing}", "batch_size=24",
      f"he.mask_bits={mask_bits}"])
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
  if packing and mask_bits == 128:
    assert slots == 7 and expected["encrypt"] == 2 * (4 * 4 + 24 + 4) + 4 * 4
  if packing and mask_bits == 64:
    assert slots == 10 and expected["encrypt"] == 2 * (3 * 4 + 12 + 2 * 4) + 3 * 4


def test_packed_operation_counts_under_a_2048_bit_key():
  # 15 slots: G = ceil(64 / 15) = 5 forward groups, 3 samples per backward plaintext (22 groups).
  ops = bench_vfl.operations_per_batch(64, 4, 4, 15)
  assert ops == {"encrypt": 5 * 4 + 22 + 3 * 4, "obfuscate": 5 * 4 + 3 * 4 + 22,
                 "decrypt": 5 * 4 + 3 * 4 + 22, "multiply and sum": 5 * 16 + 2 * 3 * 4 * 22}
  unpacked = bench_vfl.operations_per_batch(64, 4, 4)
  assert unpacked["encrypt"] == 64 * 4 + 16 and unpacked["obfuscate"] == 64 * 4 + 16 + 64 * 4


@pytest.mark.parametrize("text", ["30", "30,x", "0,300", "30,300,1", "-1,3"])
def test_features_option_refuses_anything_but_two_positive_counts(text):
  with pytest.raises(argparse.ArgumentTypeError, match=r"--features: expected ACTIVE,PASSIVE"):
    bench_vfl.parse_features(text)


def test_features_option_default_is_fates_width():
  assert bench_vfl.parse_features("30,300") == bench_vfl.FATE_FEATURES
  assert sum(bench_vfl.FATE_FEATURES) == bench_vfl.FATE["features"]
