"""The model side of encrypted training: same batches as concrete-ml, client-only preprocessing."""

import numpy as np
import pytest

from research.common import data as data_lib
from research.fhe import train


@pytest.fixture(scope="module")
def table():
  split = data_lib.breast_cancer(standardize=False)
  return split


@pytest.fixture(scope="module")
def four_features(table):
  """The client's 4 features and the circuit compiled for them (at a small p_error, so that a
  simulated run has no bootstrap error; the clear quantized run does not depend on p_error)."""
  preprocessing = train.fit_preprocessing(table.x_train, table.y_train, 4)
  spec = train.TrainerSpec(4, p_error=1e-5)
  return preprocessing.apply(table.x_train), spec, train.compile_trainer(spec)


def test_our_loop_trains_exactly_what_concrete_ml_fit_trains(table, four_features):
  from concrete.ml.sklearn import SGDClassifier

  x, spec, trainer = four_features
  plan = train.schedule(len(x), spec, iterations=12, seed=3)
  snapshots = train.train_quantized(trainer, x, table.y_train, plan, "disable", every=4)
  reference = SGDClassifier(random_state=3, max_iter=12, fit_encrypted=True,
                            parameters_range=(-1.0, 1.0))
  reference.fit(x, table.y_train, fhe="disable")
  assert [s.iteration for s in snapshots] == [4, 8, 12]
  np.testing.assert_array_equal(snapshots[-1].weights, np.ravel(reference._weights_encrypted_fit))
  assert snapshots[-1].bias == float(np.ravel(reference._bias_encrypted_fit)[0])
  assert not np.array_equal(snapshots[0].weights, snapshots[-1].weights)


def test_simulation_without_bootstrap_errors_is_the_quantized_clear_run(table, four_features):
  """What an executed run is judged against (research/fhe/compare.py): FHE simulation of the
  same circuit and schedule. With bootstrap errors made rare it equals the quantized clear run
  exactly, and the weights sit on the quantizer's grid of (high - low) / 63 (6 bits)."""
  x, spec, trainer = four_features
  plan = train.schedule(len(x), spec, iterations=6, seed=0)
  simulated = train.train_quantized(trainer, x, table.y_train, plan, "simulate", every=3)
  clear = train.train_quantized(trainer, x, table.y_train, plan, "disable", every=3)
  assert [s.iteration for s in simulated] == [3, 6]
  for a, b in zip(simulated, clear, strict=True):
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.bias == b.bias
  step = float(np.ravel(trainer.training_quantized_module.output_quantizers[0].scale)[0])
  np.testing.assert_allclose(step, 2.0 / 63)
  offsets = (simulated[-1].weights - simulated[0].weights) / step
  np.testing.assert_allclose(offsets, np.round(offsets), atol=1e-6)
  with pytest.raises(ValueError, match="execute runs through the client and server"):
    train.train_quantized(trainer, x, table.y_train, plan, "execute")


def test_preprocessing_uses_the_clients_training_data_only(table):
  preprocessing = train.fit_preprocessing(table.x_train, table.y_train, 5)
  x_train, x_test = preprocessing.apply(table.x_train), preprocessing.apply(table.x_test)
  np.testing.assert_array_equal(x_train.min(axis=0), -1.0)
  np.testing.assert_array_equal(x_train.max(axis=0), 1.0)
  assert x_test.min() >= -1.0 and x_test.max() <= 1.0  # held-out rows are clipped, not refit
  assert list(preprocessing.features) == sorted(preprocessing.features)
  from sklearn.feature_selection import f_classif
  scores, _ = f_classif(table.x_train, table.y_train)
  assert set(preprocessing.features) == set(np.argsort(-scores)[:5].tolist())
  assert train.Preprocessing.from_json(preprocessing.to_json()) == preprocessing


def test_schedule_is_deterministic_and_in_range():
  spec = train.TrainerSpec(3, parameters_range=(-0.5, 2.0))
  a, b = train.schedule(50, spec, 6, seed=1), train.schedule(50, spec, 6, seed=1)
  np.testing.assert_array_equal(a.batches, b.batches)
  assert a.weights.shape == (1, 3, 1) and a.bias.shape == (1, 1, 1)
  assert a.batches.shape == (6, train.BATCH_SIZE)
  assert all(len(set(rows)) == train.BATCH_SIZE for rows in a.batches)  # no repeat in a batch
  assert -0.5 <= a.weights.min() and a.weights.max() <= 2.0
  assert not np.array_equal(a.batches, train.schedule(50, spec, 6, seed=2).batches)
  assert train.snapshot_iterations(7, 3) == [3, 6, 7]


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((10, 3)), np.array([0, 1, 2] + [0] * 7), r"binary: expected labels 0 and 1"),
    (np.zeros((10, 3)), np.zeros(9), r"shape \(9,\); expected \(10,\)"),
    (np.full((10, 3), np.nan), np.zeros(10), r"finite"),
    (np.zeros((4, 3)), np.zeros(4), r"rows >= 8"),
])
def test_bad_tables_are_refused_naming_the_problem(x, y, match):
  with pytest.raises(ValueError, match=match):
    train.check_table(x, y)


def test_spec_and_load_table_refuse_bad_input(tmp_path):
  with pytest.raises(ValueError, match="n_features=0"):
    train.TrainerSpec(0)
  with pytest.raises(ValueError, match="parameters_range"):
    train.TrainerSpec(2, parameters_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="p_error"):
    train.TrainerSpec(2, p_error=1.5)
  np.savez(tmp_path / "t.npz", features=np.zeros((10, 2)), y=np.zeros(10))
  with pytest.raises(ValueError, match=r"missing arrays \['x'\]"):
    train.load_table(tmp_path / "t.npz")
  csv = tmp_path / "t.csv"
  rows = np.column_stack([np.arange(10.0), np.arange(10.0) * 2, np.arange(10) % 2])
  np.savetxt(csv, rows, delimiter=",", header="a,b,label", comments="")
  x, y = train.load_table(csv)
  np.testing.assert_array_equal(x, rows[:, :2])
  assert y.dtype == np.int64 and y.tolist() == (np.arange(10) % 2).tolist()
  with pytest.raises(ValueError, match="expected .npz"):
    (tmp_path / "t.txt").write_text("1")
    train.load_table(tmp_path / "t.txt")
