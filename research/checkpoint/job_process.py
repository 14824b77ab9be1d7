"""One jax process of the checkpointed training job (an edge: a process, files, clocks).

  python -m research.checkpoint.job_process SPEC.json --process I --attempt A --coordinator H:P
      --source init|local|peer|persistent --step S --memory-file F --status-file F

Started by its node agent (research/checkpoint/transport.py). It joins the multi-controller job
(`jax.distributed`, gloo between CPU processes), restores the planned step from where the plan
says (its node's local memory, where a peer's replica was staged too; or orbax), trains, writes a
snapshot of its own shards into local memory every `snapshot_every` steps and an async orbax
checkpoint every `persist_every`, and heartbeats through its status file all along. At the end
it writes its final shards to the results folder. It decides nothing about failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from research.checkpoint import protocol
from research.checkpoint import store

HEARTBEAT_SECONDS = 0.1


def _heartbeat(status: store.ProcessStatus, stop: threading.Event) -> None:
  while not stop.wait(HEARTBEAT_SECONDS):
    status.beat()


def _append_event(path: Path, event: dict) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(event) + "\n")


def _train_step(lowered, cache_dir: str | None, process: int, devices):
  """The compiled step: this process's own serialized executable when the cache has it.

  jax's persistent compilation cache does not serve a restarted job's processes other than 0
  on CPU (their keys differ and only process 0 writes: papers/results/
  checkpoint_compile_cache_keys.txt), so each process keeps its own executable, keyed by the
  lowered program's text and its process index; `devices`: the mesh's, in its order. The
  folder is the job's own: a serialized executable runs whatever it holds, so never point it
  at files others can write. Returns (executable, "loaded" | "compiled").
  """
  import hashlib  # pylint: disable=import-outside-toplevel
  import pickle  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import serialize_executable  # pylint: disable=import-outside-toplevel
  from research.common import records  # pylint: disable=import-outside-toplevel

  path = None
  if cache_dir:
    key = hashlib.sha256(f"{jax.__version__}|{process}|{lowered.as_text()}".encode())
    path = Path(cache_dir) / f"meshwork_train_step.p{process}.{key.hexdigest()[:24]}.pkl"
    if path.is_file():
      try:
        payload, in_tree, out_tree = pickle.loads(path.read_bytes())
        return serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, execution_devices=list(devices)), "loaded"
      except Exception:  # pylint: disable=broad-except  (a stale or cut file: compile again)
        pass
  compiled = lowered.compile()
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records.atomic_write_bytes(path, pickle.dumps(serialize_executable.serialize(compiled)))
  return compiled, "compiled"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("spec")
  parser.add_argument("--process", type=int, required=True)
  parser.add_argument("--attempt", type=int, required=True)
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--source", choices=[s.value for s in protocol.Source], required=True)
  parser.add_argument("--step", type=int, required=True)
  parser.add_argument("--memory-file", required=True)
  parser.add_argument("--status-file", required=True)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  started = time.perf_counter()
  args = parse_args(sys.argv[1:] if argv is None else argv)
  spec = protocol.JobSpec.from_json(json.loads(Path(args.spec).read_text()))
  source = protocol.Source(args.source)
  status = store.ProcessStatus(args.status_file)
  status.write(os.getpid(), args.step, "starting")
  stop = threading.Event()
  threading.Thread(target=_heartbeat, args=(status, stop), daemon=True).start()

  import jax  # pylint: disable=import-outside-toplevel
  from research.checkpoint import worker  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if spec.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", spec.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=spec.num_processes, process_id=args.process)
  if jax.local_device_count() != spec.devices_per_process:
    raise SystemExit(f"process {args.process} sees {jax.local_device_count()} devices; the job "
                     f"spec says devices_per_process={spec.devices_per_process}")
  problem = worker.read_problem(spec.inputs_file, spec.hidden, spec.batch_per_device,
                                spec.learning_rate, spec.dropout, spec.seed)
  mesh = worker.data_mesh()
  job = worker.fingerprint(problem, jax.device_count(), spec.steps)
  if job != spec.job:
    raise SystemExit(f"this process computes job fingerprint {job}; the spec says {spec.job} "
                     "(another config, data or device count)")
  abstract = worker.abstract_state(problem, mesh)
  template = store.local_shards_template(abstract)
  state_bytes = store.packed_size(template)
  memory = Path(args.memory_file)
  slots = store.LocalSlots(memory, state_bytes, create=not memory.exists(),
                           slots=spec.memory_slots)
  persistent = (store.PersistentStore(spec.persistent_dir)
                if spec.persist_every or source is protocol.Source.PERSISTENT else None)
  initialized = time.perf_counter()

  status.write(os.getpid(), args.step, "restoring")
  if source is protocol.Source.INIT:
    state = worker.replicate(worker.init_state(problem), mesh)
  elif source is protocol.Source.PERSISTENT:
    state = persistent.restore(args.step, abstract)
  else:  # LOCAL and PEER: a peer's replica was staged into this node's memory before launch
    state = store.from_local_shards(abstract, slots.read(template, args.step, spec.job))
  restored_step = int(jax.device_get(state.step))
  if restored_step != args.step:
    raise SystemExit(f"restored a state of step {restored_step} from {source.value}; the plan "
                     f"says step {args.step}")
  restored = time.perf_counter()
  results = Path(spec.results_dir)
  events = results / f"events.p{args.process}.jsonl"
  _append_event(events, {
      "event": "restored", "attempt": args.attempt, "process": args.process,
      "source": source.value, "step": args.step, "init_s": round(initialized - started, 4),
      "restore_s": round(restored - initialized, 4)})
  num_devices = mesh.shape[worker.DATA_AXIS]
  position = jax.device_get(state.data_position)
  compile_begin = time.perf_counter()
  example = worker.process_batch(problem, mesh, worker.global_batch_rows(problem, num_devices,
                                                                         position)[0])
  train_step, compiled_how = _train_step(
      worker.make_train_step(problem, mesh).lower(state, *example,
                                                  worker.replicate(position, mesh)),
      spec.compilation_cache_dir, args.process, mesh.devices.flat)
  compile_s = time.perf_counter() - compile_begin
  step, first_step_s, snapshot_s = args.step, None, 0.0
  status.write(os.getpid(), step, "training")
  while step < spec.steps:
    begin = time.perf_counter()
    rows, position = worker.global_batch_rows(problem, num_devices, position)
    x, y = worker.process_batch(problem, mesh, rows)
    state, _ = train_step(state, x, y, worker.replicate(position, mesh))
    jax.block_until_ready(state)
    step += 1
    if first_step_s is None:
      first_step_s = time.perf_counter() - begin
    if spec.snapshot_every and step % spec.snapshot_every == 0:
      copy_begin = time.perf_counter()
      slots.write(step, store.local_shards(state), spec.job)
      snapshot_s += time.perf_counter() - copy_begin
    if spec.persist_every and step % spec.persist_every == 0:
      persistent.save(step, state)
    elif persistent is not None:
      persistent.commit_finished(wait=False)
    status.write(os.getpid(), step, "training")
    pause = spec.min_step_seconds - (time.perf_counter() - begin)
    if pause > 0:
      time.sleep(pause)
  if persistent is not None:
    persistent.close()
  store.save_shards(results / f"final.p{args.process}.npz", store.local_shards(state))
  _append_event(events, {
      "event": "done", "attempt": args.attempt, "process": args.process, "step": step,
      "compile_s": round(compile_s, 4), "compiled": compiled_how,
      "first_step_s": first_step_s and round(first_step_s, 4),
      "snapshot_s": round(snapshot_s, 4), "total_s": round(time.perf_counter() - started, 4)})
  jax.distributed.shutdown()  # a barrier: every process reached the end
  status.write(os.getpid(), step, "done")
  stop.set()
  slots.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
