import numpy as np
import pytest

from research.common import data


def test_digits_split_is_documented_stratified_and_seeded():
  split = data.digits()
  assert split.x_train.shape == (1347, 64) and split.x_test.shape == (450, 64)
  assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
  assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
  assert split.num_classes == 10
  train_share = np.bincount(split.y_train) / len(split.y_train)
  test_share = np.bincount(split.y_test) / len(split.y_test)
  np.testing.assert_allclose(train_share, test_share, atol=0.01)
  again = data.digits()
  np.testing.assert_array_equal(split.x_test, again.x_test)
  assert not np.array_equal(split.y_test, data.digits(seed=1).y_test)
  with pytest.raises(ValueError, match="test_fraction"):
    data.digits(test_fraction=1.5)


def test_breast_cancer_is_standardized_with_training_statistics_only():
  split = data.breast_cancer()
  assert split.x_train.shape == (398, 30) and split.x_test.shape == (171, 30)
  np.testing.assert_allclose(split.x_train.mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(split.x_train.std(axis=0), 1.0, atol=1e-3)
  assert np.abs(split.x_test.mean(axis=0)).max() > 1e-3  # test statistics were not used
  raw = data.breast_cancer(standardize=False)
  assert raw.x_train.max() > 100  # raw areas are in the hundreds to thousands
  assert set(np.unique(split.y_train)) == {0, 1}


def test_synthetic_classification_is_seeded():
  a = data.synthetic_classification(num_samples=500, num_features=8, num_classes=3, seed=2)
  b = data.synthetic_classification(num_samples=500, num_features=8, num_classes=3, seed=2)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert a.x_train.shape == (400, 8) and a.num_classes == 3
  with pytest.raises(ValueError, match="num_classes"):
    data.synthetic_classification(num_classes=1)


@pytest.mark.parametrize("name, shape", [("camera", (512, 512, 1)), ("astronaut", (512, 512, 3)),
                                         ("china", (427, 640, 3))])
def test_bundled_images_load_offline_as_unit_floats(name, shape):
  image = data.bundled_image(name)
  assert image.shape == shape and image.dtype == np.float32
  assert 0.0 <= image.min() < image.max() <= 1.0
  assert data.bundled_image(name, grayscale=True).shape == shape[:2] + (1,)


def test_unknown_image_names_the_choices():
  with pytest.raises(ValueError, match="'lily' is not bundled; expected one of china"):
    data.bundled_image("lily")


def test_iid_partition_deals_every_index_once():
  parts = data.iid_partition(103, 10, seed=0)
  assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))
  with pytest.raises(ValueError, match="num_clients"):
    data.iid_partition(5, 6, seed=0)


def test_dirichlet_partition_covers_all_and_skews_with_small_alpha():
  labels = data.digits().y_train

  def mean_top_class_share(alpha):
    parts = data.dirichlet_partition(labels, 10, alpha, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])

  assert mean_top_class_share(0.1) > 0.5 > mean_top_class_share(100.0)
  with pytest.raises(ValueError, match="alpha"):
    data.dirichlet_partition(labels, 10, 0.0, seed=0)


def test_stack_clients_pads_and_counts():
  x = np.arange(10, dtype=np.float32)[:, None]
  y = np.arange(10)
  shards = data.stack_clients(x, y, [np.array([0, 1, 2]), np.array([5])])
  assert shards.x.shape == (2, 3, 1) and shards.count.tolist() == [3, 1]
  np.testing.assert_array_equal(shards.y, [[0, 1, 2], [5, 5, 5]])


def test_federated_split_deals_the_training_set():
  split, shards = data.federated_split("digits", 7, "dirichlet", 0.5, seed=1)
  assert shards.count.sum() == len(split.y_train) and shards.x.shape[0] == 7
  _, again = data.federated_split("digits", 7, "dirichlet", 0.5, seed=1)
  np.testing.assert_array_equal(shards.y, again.y)
  with pytest.raises(ValueError, match="partition='shards'"):
    data.federated_split("digits", 7, "shards", 0.5, seed=1)
  with pytest.raises(ValueError, match="dataset='mnist'"):
    data.federated_split("mnist", 7, "iid", 0.5, seed=1)
