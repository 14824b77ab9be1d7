import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from research.common import records


def test_to_jsonable_converts_arrays_scalars_and_non_finite():
  out = records.to_jsonable({"a": jnp.float32(1.5), "b": np.arange(3), "c": (1, float("nan")),
                             "d": np.float64("inf"), "e": jnp.ones((2,)), 3: None})
  assert out == {"a": 1.5, "b": [0, 1, 2], "c": [1, "nan"], "d": "inf", "e": [1.0, 1.0],
                 "3": None}
  json.dumps(out, allow_nan=False)
  with pytest.raises(TypeError, match="cannot record"):
    records.to_jsonable(object())


def test_atomic_write_replaces_whole_file(tmp_path):
  path = tmp_path / "sub" / "summary.json"
  records.atomic_write_json(path, {"x": 1})
  records.atomic_write_json(path, {"x": 2})
  assert records.read_json(path) == {"x": 2}
  assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "summary.json"
  records.atomic_write_json(path, {"x": 1})

  class Unserializable:
    pass

  with pytest.raises(TypeError):
    records.atomic_write_json(path, {"x": Unserializable()})

  class BrokenFigure:
    def savefig(self, buffer, **kwargs):
      buffer.write(b"partial")
      raise RuntimeError("killed mid-plot")

  with pytest.raises(RuntimeError):
    records.atomic_save_figure(tmp_path / "plot.png", BrokenFigure())
  assert records.read_json(path) == {"x": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_metrics_lines_and_truncated_tail(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with records.MetricsWriter(path) as writer:
    writer.write(1, loss=jnp.float32(0.5))
    writer.write(2, loss=0.25, accuracy=np.float32(0.75))
    with pytest.raises(TypeError, match="step must be an int"):
      writer.write(1.5, loss=0.1)
  with open(path, "a") as f:
    f.write('{"step": 3, "lo')  # what a kill mid-write leaves
  rows = records.read_metrics(path)
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[1] == {"step": 2, "loss": 0.25, "accuracy": 0.75}


def test_markdown_table():
  text = records.write_markdown_table(["a", "b"], [[1, "x"], [math.pi, "y"]])
  assert text.splitlines()[:3] == ["| a | b |", "|---|---|", "| 1 | x |"]


def test_atomic_save_npz_round_trips_and_leaves_no_temporary(tmp_path):
  path = records.atomic_save_npz(tmp_path / "a.npz", x=np.arange(6.0).reshape(2, 3),
                                 y=np.array([0, 1]))
  with np.load(path) as arrays:
    np.testing.assert_array_equal(arrays["x"], np.arange(6.0).reshape(2, 3))
    assert arrays["y"].tolist() == [0, 1]
  assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
  import hashlib
  data = bytes(range(256)) * 1000
  (tmp_path / "f").write_bytes(data)
  assert records.sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()
