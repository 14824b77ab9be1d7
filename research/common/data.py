"""Data sources that need no download, each returning numpy arrays with a documented split.

Every classification source returns a `Split` (x_train, y_train, x_test, y_test): features
float32, labels int32, split stratified by label with `sklearn.model_selection.train_test_split`
at the given `test_fraction` and `seed`, so the same arguments give the same arrays anywhere.
No jax here: the FHE environment (numpy 1.26) may import this module too.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Split(NamedTuple):
  x_train: np.ndarray  # (n_train, ...) float32
  y_train: np.ndarray  # (n_train,) int32
  x_test: np.ndarray   # (n_test, ...) float32
  y_test: np.ndarray   # (n_test,) int32

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max())) + 1


def _check_fraction(test_fraction: float) -> None:
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction!r}: expected a float in (0, 1)")


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Split:
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  _check_fraction(test_fraction)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y)
  return Split(x_train.astype(np.float32), y_train.astype(np.int32),
               x_test.astype(np.float32), y_test.astype(np.int32))


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
  """scikit-learn's 1797 8x8 handwritten digits, 10 classes.

  x: (n, 64) pixel intensities scaled from 0..16 to [0, 1]. Default split: 1347 train / 450 test.
  """
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  data = load_digits()
  return _split(data.data / 16.0, data.target, test_fraction, seed)


def breast_cancer(test_fraction: float = 0.3, seed: int = 0, standardize: bool = True) -> Split:
  """scikit-learn's Wisconsin breast-cancer data: 569 x 30 features, labels 0 malignant / 1 benign.

  With `standardize`, features are z-scored with the training split's mean and std only (no test
  statistics leak). Default split: 398 train / 171 test.
  """
  from sklearn.datasets import load_breast_cancer  # pylint: disable=import-outside-toplevel

  data = load_breast_cancer()
  split = _split(data.data, data.target, test_fraction, seed)
  if not standardize:
    return split
  mean = split.x_train.mean(axis=0)
  std = split.x_train.std(axis=0) + 1e-8
  return split._replace(x_train=((split.x_train - mean) / std).astype(np.float32),
                        x_test=((split.x_test - mean) / std).astype(np.float32))


def synthetic_classification(num_samples: int = 20_000, num_features: int = 64,
                             num_classes: int = 10, test_fraction: float = 0.2,
                             seed: int = 0) -> Split:
  """A seeded synthetic classification set (`sklearn.datasets.make_classification`).

  Half the features are informative, classes are 2 Gaussian clusters each; features standardized.
  """
  from sklearn.datasets import make_classification  # pylint: disable=import-outside-toplevel

  for name, value, low in (("num_samples", num_samples, 2 * num_classes),
                           ("num_features", num_features, 2), ("num_classes", num_classes, 2)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"{name}={value!r}: expected an int >= {low}")
  x, y = make_classification(
      n_samples=num_samples, n_features=num_features, n_informative=max(2, num_features // 2),
      n_redundant=0, n_classes=num_classes, n_clusters_per_class=2, class_sep=1.0,
      random_state=seed)
  x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
  return _split(x, y, test_fraction, seed)


SKIMAGE_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "cat", "rocket", "brick", "grass",
                  "gravel", "coins", "moon", "page", "text", "hubble_deep_field",
                  "immunohistochemistry", "retina", "horse", "clock", "colorwheel", "logo",
                  "microaneurysms", "shepp_logan_phantom", "cell")
SKLEARN_IMAGES = ("china", "flower")


def bundled_image(name: str, grayscale: bool = False) -> np.ndarray:
  """One image shipped inside scikit-image or scikit-learn, as float32 in [0, 1].

  Shape (H, W, 3) for colour images, (H, W, 1) for grey ones or when `grayscale`.
  Names: `SKIMAGE_IMAGES` (scikit-image's bundled data) and `SKLEARN_IMAGES`
  (scikit-learn's two 427x640 sample photos).
  """
  if name in SKLEARN_IMAGES:
    from sklearn.datasets import load_sample_image  # pylint: disable=import-outside-toplevel
    image = load_sample_image(f"{name}.jpg")
  elif name in SKIMAGE_IMAGES:
    from skimage import data as skdata  # pylint: disable=import-outside-toplevel
    image = getattr(skdata, name)()
  else:
    raise ValueError(f"image name {name!r} is not bundled; expected one of "
                     + ", ".join(SKLEARN_IMAGES + SKIMAGE_IMAGES))
  image = np.asarray(image)
  if image.dtype == bool:
    image = image.astype(np.float32)
  elif np.issubdtype(image.dtype, np.integer):
    image = image.astype(np.float32) / np.iinfo(image.dtype).max
  image = image.astype(np.float32)
  if image.ndim == 2:
    image = image[..., None]
  image = image[..., :3]  # drop an alpha channel
  if grayscale and image.shape[-1] == 3:
    image = (image @ np.array([0.2125, 0.7154, 0.0721], np.float32))[..., None]
  return np.clip(image, 0.0, 1.0)


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles example indices and deals them to clients in near-equal parts (sizes differ by <= 1)."""
  if not isinstance(num_clients, int) or not 1 <= num_clients <= num_examples:
    raise ValueError(f"num_clients={num_clients!r}: expected an int in [1, {num_examples}]")
  order = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float,
                        seed: int, min_size: int = 1) -> list[np.ndarray]:
  """Label-skewed split: each class's examples go to clients in Dirichlet(alpha) proportions.

  Small alpha (0.1) gives clients dominated by one or two classes; large alpha tends to IID
  (Hsu et al., 2019). Redraws until every client holds at least `min_size` examples.
  """
  labels = np.asarray(labels)
  if alpha <= 0:
    raise ValueError(f"alpha={alpha!r}: expected a positive float")
  if not isinstance(num_clients, int) or not 1 <= num_clients * min_size <= len(labels):
    raise ValueError(f"num_clients={num_clients!r}: expected an int with num_clients * min_size "
                     f"<= {len(labels)} examples")
  rng = np.random.default_rng(seed)
  for _ in range(1000):
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client] += chunk.tolist()
    if min(len(p) for p in parts) >= min_size:
      return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
  raise ValueError(f"could not give each of {num_clients} clients {min_size} examples with "
                   f"alpha={alpha}; lower num_clients or raise alpha")


class ClientShards(NamedTuple):
  """Per-client data padded to a common length so clients can be vmapped."""
  x: np.ndarray       # (num_clients, max_len, ...) float32
  y: np.ndarray       # (num_clients, max_len) int32
  count: np.ndarray   # (num_clients,) int32: valid examples per client (the rest is padding)


def stack_clients(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray]) -> ClientShards:
  """Gathers each client's examples and pads to the longest client (padding repeats example 0)."""
  max_len = max(len(p) for p in parts)
  padded = [np.concatenate([p, np.full(max_len - len(p), p[0], p.dtype)]) for p in parts]
  index = np.stack(padded)
  return ClientShards(x[index].astype(np.float32), y[index].astype(np.int32),
                      np.array([len(p) for p in parts], np.int32))


CLASSIFICATION_SETS = {"digits": digits, "synthetic": synthetic_classification}
PARTITIONS = ("iid", "dirichlet")


def federated_split(dataset: str, num_clients: int, partition: str, dirichlet_alpha: float,
                    seed: int) -> tuple[Split, ClientShards]:
  """A classification set and its training split dealt to clients (IID or Dirichlet label skew).

  The federated experiments' common first step: same arguments, same shards.
  """
  if dataset not in CLASSIFICATION_SETS:
    raise ValueError(f"dataset={dataset!r}: expected one of {sorted(CLASSIFICATION_SETS)}")
  if partition not in PARTITIONS:
    raise ValueError(f"partition={partition!r}: expected one of {PARTITIONS}")
  split = CLASSIFICATION_SETS[dataset](seed=seed)
  if partition == "iid":
    parts = iid_partition(len(split.y_train), num_clients, seed)
  else:
    parts = dirichlet_partition(split.y_train, num_clients, dirichlet_alpha, seed)
  return split, stack_clients(split.x_train, split.y_train, parts)
