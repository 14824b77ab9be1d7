"""A job process keeps its own compiled step: loaded on restart, the same bits as compiled."""

import jax
import numpy as np

from research.checkpoint import job_process
from research.checkpoint import worker


def test_the_train_step_executable_is_kept_per_process_and_loaded_back(tmp_path):
  problem = worker.make_problem((8,), batch_per_device=4)
  mesh = worker.data_mesh(jax.devices()[:2])
  position = np.zeros(2, np.int32)
  rows, next_position = worker.global_batch_rows(problem, 2, position)
  x, y = worker.process_batch(problem, mesh, rows)

  def lowered():
    state = worker.replicate(worker.init_state(problem), mesh)
    return worker.make_train_step(problem, mesh).lower(state, x, y,
                                                      worker.replicate(next_position, mesh))

  def step(executable):
    state = worker.replicate(worker.init_state(problem), mesh)
    new, loss = executable(state, x, y, worker.replicate(next_position, mesh))
    return [np.asarray(a) for a in jax.tree.leaves(new)] + [np.asarray(loss)]

  compiled, how = job_process._train_step(lowered(), str(tmp_path), 0, mesh.devices.flat)
  assert how == "compiled" and len(list(tmp_path.glob("meshwork_train_step.p0.*.pkl"))) == 1
  loaded, how = job_process._train_step(lowered(), str(tmp_path), 0, mesh.devices.flat)
  assert how == "loaded"
  for a, b in zip(step(compiled), step(loaded), strict=True):
    np.testing.assert_array_equal(a, b, strict=True)
  # Another process index is another executable; a cut file is compiled again.
  assert job_process._train_step(lowered(), str(tmp_path), 1, mesh.devices.flat)[1] == "compiled"
  [kept] = tmp_path.glob("meshwork_train_step.p1.*.pkl")
  kept.write_bytes(kept.read_bytes()[:100])
  assert job_process._train_step(lowered(), str(tmp_path), 1, mesh.devices.flat)[1] == "compiled"
  # No cache folder: compiled every time.
  assert job_process._train_step(lowered(), None, 0, mesh.devices.flat)[1] == "compiled"
