"""Encrypted training of a diagnosis model (binary logistic regression) with concrete-ml.

concrete-ml 1.9's `SGDClassifier(fit_encrypted=True)` compiles one training iteration into an
FHE circuit: inputs (x batch [1, 8, F], y batch [1, 8, 1], weights [1, F, 1], bias [1, 1, 1]),
outputs the updated (weights, bias), composable so the encrypted outputs feed the next iteration
without decryption. This module holds everything about that model that does not cross a party
boundary:

- `TrainerSpec` and `compile_trainer`: the circuit depends only on the feature count and the
  parameter range, never on anyone's data: it is compiled on synthetic extremes of [-1, 1], the
  range the client scales its own features into (so the cloud never sees clear statistics);
- `Preprocessing`: the client's own feature selection and scaling, fit on its training data;
- `Schedule`: initial weights and the batch order, drawn from a seed exactly as
  `SGDClassifier._fit_encrypted` draws them, so a run here and `SGDClassifier(random_state=seed)`
  train on the same batches (pinned by a test);
- `train_quantized`: the iteration loop in the clear or in simulation, with snapshots;
- `metrics` and `clear_baselines`: how the decrypted model is judged.

numpy, scikit-learn and concrete-ml only (the FHE environment, `.venv-fhe`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

# concrete-ml 1.9 fixes the encrypted-training batch at 8 rows (`SGDClassifier.batch_size`).
BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
  """What the training circuit is compiled for; the package manifest records it."""
  n_features: int
  parameters_range: tuple[float, float] = (-1.0, 1.0)
  p_error: float = 0.01  # per-PBS error probability; concrete-ml's training default

  def __post_init__(self):
    if not isinstance(self.n_features, (int, np.integer)) or self.n_features < 1:
      raise ValueError(f"n_features={self.n_features!r}; expected a positive int")
    low, high = self.parameters_range
    if not low < 0 < high:
      raise ValueError(f"parameters_range={self.parameters_range!r}; expected (low, high) with "
                       "low < 0 < high")
    if not 0 < self.p_error < 1:
      raise ValueError(f"p_error={self.p_error!r}; expected a probability in (0, 1)")

  def shapes(self) -> dict[str, list[int]]:
    """Shapes of the circuit's inputs, as the upload's meta states them."""
    return {"x": [1, BATCH_SIZE, self.n_features], "y": [1, BATCH_SIZE, 1],
            "weights": [1, self.n_features, 1], "bias": [1, 1, 1]}

  def to_json(self) -> dict[str, Any]:
    return {"n_features": int(self.n_features), "parameters_range": list(self.parameters_range),
            "p_error": float(self.p_error), "batch_size": BATCH_SIZE}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "TrainerSpec":
    return cls(int(d["n_features"]), tuple(float(v) for v in d["parameters_range"]),
               float(d["p_error"]))


def compile_trainer(spec: TrainerSpec):
  """An `SGDClassifier` whose `training_quantized_module` is the compiled training circuit.

  Compiled on synthetic rows whose per-feature minimum and maximum are -1 and +1: concrete-ml
  calibrates the circuit on (label, x_min / x_max / 0, parameter extremes) combinations, so these
  rows give the circuit for any data scaled into [-1, 1].
  """
  from concrete.ml.sklearn import SGDClassifier  # pylint: disable=import-outside-toplevel

  rows = np.zeros((BATCH_SIZE, spec.n_features))  # one batch; the zeros are in the calibration
  rows[0], rows[1] = -1.0, 1.0                     # set anyway
  labels = np.arange(BATCH_SIZE) % 2
  model = SGDClassifier(random_state=0, max_iter=1, fit_encrypted=True,
                        parameters_range=spec.parameters_range)
  model.training_p_error = spec.p_error
  model.fit(rows, labels, fhe="disable")
  return model


# --- the client's preprocessing ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Feature selection and min-max scaling into [-1, 1], fit by the client on its own data."""
  features: tuple[int, ...]  # selected column indices of the client's table
  low: tuple[float, ...]     # per selected feature, training minimum
  high: tuple[float, ...]    # per selected feature, training maximum

  def apply(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] <= max(self.features):
      raise ValueError(f"x has shape {x.shape}; expected (rows, >{max(self.features)}) columns")
    low, high = np.asarray(self.low), np.asarray(self.high)
    span = np.where(high > low, high - low, 1.0)
    return np.clip(2.0 * (x[:, list(self.features)] - low) / span - 1.0, -1.0, 1.0)

  def to_json(self) -> dict[str, Any]:
    return {"features": list(self.features), "low": list(self.low), "high": list(self.high)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Preprocessing":
    return cls(tuple(int(i) for i in d["features"]), tuple(float(v) for v in d["low"]),
               tuple(float(v) for v in d["high"]))


def fit_preprocessing(x: np.ndarray, y: np.ndarray, n_features: int) -> Preprocessing:
  """Keeps the `n_features` columns with the largest ANOVA F-score (scikit-learn's f_classif),
  in their original order, and scales each by its training range."""
  check_table(x, y, "x", "y")
  if not 1 <= n_features <= x.shape[1]:
    raise ValueError(f"n_features={n_features}; the table has {x.shape[1]} columns")
  if n_features == x.shape[1]:
    features = tuple(range(x.shape[1]))
  else:
    from sklearn.feature_selection import f_classif  # pylint: disable=import-outside-toplevel

    scores, _ = f_classif(x, y)
    scores = np.nan_to_num(scores, nan=-1.0)
    features = tuple(sorted(int(i) for i in np.argsort(-scores, kind="stable")[:n_features]))
  columns = x[:, list(features)]
  return Preprocessing(features, tuple(columns.min(axis=0).tolist()),
                       tuple(columns.max(axis=0).tolist()))


def check_table(x: np.ndarray, y: np.ndarray, x_name: str = "x", y_name: str = "y") -> None:
  """A training table: finite 2-D features, binary 0/1 labels, one label per row."""
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or x.shape[0] < BATCH_SIZE:
    raise ValueError(f"{x_name} has shape {x.shape}; expected (rows >= {BATCH_SIZE}, features)")
  if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
    raise ValueError(f"{x_name} must be finite numbers (dtype {x.dtype}, "
                     f"{int(np.sum(~np.isfinite(x.astype(float))))} non-finite values)")
  if y.shape != (x.shape[0],):
    raise ValueError(f"{y_name} has shape {y.shape}; expected ({x.shape[0]},), one label per row")
  if not np.all(np.isin(y, (0, 1))):
    raise ValueError(f"{y_name} holds {sorted(set(np.unique(y).tolist()))}; encrypted training "
                     "is binary: expected labels 0 and 1")


# --- the batch schedule and the iteration loop ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Initial parameters and the batch order of one training run."""
  weights: np.ndarray  # shape (1, F, 1), float64, uniform over parameters_range
  bias: np.ndarray     # shape (1, 1, 1)
  batches: np.ndarray  # shape (iterations, BATCH_SIZE), int row indices


def schedule(n_rows: int, spec: TrainerSpec, iterations: int, seed: int) -> Schedule:
  """Draws what `SGDClassifier(random_state=seed)._fit_encrypted` draws, in the same order."""
  if iterations < 1:
    raise ValueError(f"iterations={iterations}; expected >= 1")
  if n_rows < BATCH_SIZE:
    raise ValueError(f"n_rows={n_rows}; a batch needs {BATCH_SIZE} rows")
  rng = np.random.default_rng(seed)
  low, high = spec.parameters_range
  weights = rng.uniform(low=low, high=high, size=(1, spec.n_features, 1))
  bias = rng.uniform(low=low, high=high, size=(1, 1, 1))
  batches = np.stack([rng.choice(n_rows, size=BATCH_SIZE, replace=False)
                      for _ in range(iterations)])
  return Schedule(weights, bias, batches)


def batch(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The circuit's (x, y) inputs for one batch: shapes [1, 8, F] and [1, 8, 1], float."""
  return (x[rows].astype(float).reshape(1, BATCH_SIZE, x.shape[1]),
          y[rows].astype(float).reshape(1, BATCH_SIZE, 1))


@dataclasses.dataclass(frozen=True)
class Snapshot:
  iteration: int
  weights: np.ndarray  # (F,) dequantized
  bias: float


def snapshot_iterations(iterations: int, every: int) -> list[int]:
  """Iterations after which a run keeps its parameters: every `every`-th, and the last."""
  every = max(1, int(every))
  return sorted(set(range(every, iterations + 1, every)) | {iterations})


def train_quantized(trainer, x: np.ndarray, y: np.ndarray, plan: Schedule, mode: str,
                    every: int = 1) -> list[Snapshot]:
  """Runs the training circuit over `plan` in the clear ("disable") or in FHE simulation.

  The same steps as `SGDClassifier._fit_encrypted` (quantize each batch, iterate the quantized
  module, dequantize), keeping a snapshot after the iterations `snapshot_iterations` names.
  """
  if mode not in ("disable", "simulate"):
    raise ValueError(f"mode={mode!r}; expected 'disable' or 'simulate' (execute runs through the "
                     "client and server packages)")
  module = trainer.training_quantized_module
  _, _, q_weights, q_bias = module.quantize_input(None, None, plan.weights, plan.bias)
  keep = set(snapshot_iterations(len(plan.batches), every))
  snapshots = []
  for t, rows in enumerate(plan.batches, start=1):
    x_batch, y_batch = batch(x, y, rows)
    q_x, q_y, _, _ = module.quantize_input(x_batch, y_batch, None, None)
    q_weights, q_bias = module.quantized_forward(q_x, q_y, q_weights, q_bias, fhe=mode)
    if t in keep:
      weights, bias = module.dequantize_output(q_weights, q_bias)
      snapshots.append(Snapshot(t, np.ravel(weights).copy(), float(np.ravel(bias)[0])))
  return snapshots


# --- judging a model --------------------------------------------------------------------------


def predict(weights: np.ndarray, bias: float, x: np.ndarray) -> np.ndarray:
  """Class 1 where the logistic model's logit is positive (probability above one half)."""
  return (np.asarray(x) @ np.ravel(weights) + bias > 0).astype(np.int64)


def metrics(weights: np.ndarray, bias: float, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  from sklearn.metrics import accuracy_score, f1_score  # pylint: disable=import-outside-toplevel

  predicted = predict(weights, bias, x)
  return {"accuracy": float(accuracy_score(y, predicted)),
          "f1": float(f1_score(y, predicted, zero_division=0.0))}


def clear_baselines(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
  """The same model trained in the clear on the same scaled features.

  scikit-learn's LogisticRegression and SGDClassifier(log_loss), and concrete-ml's
  SGDClassifier with fit_encrypted=False (clear float training, 8-bit quantized inference).
  """
  from concrete.ml.sklearn import SGDClassifier  # pylint: disable=import-outside-toplevel
  from sklearn import linear_model  # pylint: disable=import-outside-toplevel
  from sklearn.metrics import accuracy_score, f1_score  # pylint: disable=import-outside-toplevel

  models = {
      "sklearn_logistic_regression": linear_model.LogisticRegression(max_iter=1000),
      "sklearn_sgd": linear_model.SGDClassifier(loss="log_loss", random_state=seed),
      "concrete_ml_clear": SGDClassifier(loss="log_loss", random_state=seed),
  }
  results = {}
  for name, model in models.items():
    model.fit(x_train, y_train)
    predicted = np.asarray(model.predict(x_test)).astype(np.int64)
    results[name] = {"accuracy": float(accuracy_score(y_test, predicted)),
                     "f1": float(f1_score(y_test, predicted, zero_division=0.0))}
  return results


def load_table(path, x_key: str = "x", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
  """A client's table from `.npz` (arrays `x`, `y`) or `.csv` (header row, last column label)."""
  import pathlib  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"data file {str(path)!r} does not exist")
  if path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as arrays:
      missing = {x_key, y_key} - set(arrays.files)
      if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}; expected {x_key!r} "
                         f"(rows, features) and {y_key!r} (rows,)")
      x, y = arrays[x_key], arrays[y_key]
  elif path.suffix == ".csv":
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    x, y = table[:, :-1], table[:, -1]
  else:
    raise ValueError(f"data file {str(path)!r}: expected .npz (x, y) or .csv (last column label)")
  if np.issubdtype(np.asarray(y).dtype, np.floating) and np.all(np.mod(y, 1) == 0):
    y = y.astype(np.int64)
  check_table(x, y, f"{path.name}:{x_key}", f"{path.name}:{y_key}")
  return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)


def summarize(snapshots: Sequence[Snapshot], x: np.ndarray, y: np.ndarray) -> list[dict]:
  """Per snapshot: iteration, accuracy, F1 on (x, y)."""
  return [{"iteration": s.iteration, **metrics(s.weights, s.bias, x, y)} for s in snapshots]
