"""Vertical federated training with an encrypted interaction layer, against its two baselines.

Two parties hold different features of the same samples under their own, differently ordered
and partially overlapping ID lists (each holds a seeded random `id_coverage` share of the IDs).
They align on the intersection by ECDH private set intersection (research/vfl/psi.py), then
train one network (research/vfl/model.py) three ways on the same aligned rows, schedule and
initial weights:

  encrypted    the split protocol with the Paillier interaction layer (research/vfl/parties.py)
  plaintext    the same split, with the passive output and its gradient crossing in the clear
  centralized  the same network trained in one place on all features

and reports test AUC / accuracy per epoch, training seconds and bytes per epoch, and a loss curve
plot (loss.png). `num_seeds` > 1 repeats everything on seeds seed, seed + 1, ... (the network
init, the split into train / test rows and the batch order change; the data do not).

One process runs both parties (messages still encoded to bytes and counted). With
`--processes 2` the parties are two OS processes talking gRPC (process 0 the active party, which
writes the results; process 1 the passive party), one method (encrypted or plaintext). There
each party draws its initial weights and (passive) its noise from its own private seed
(`party_seeds`; drawn from the OS unless given): the one-process run simulates both parties and
derives everything from `seed`.

  python -m experiments.run configs/vfl/breast_cancer.py
  python -m experiments.run configs/vfl/grpc.py --processes 2
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import secrets
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from research.common import config as config_lib
from research.vfl import he
from research.vfl import messages as msg
from research.vfl import model as model_lib
from research.vfl import parties
from research.vfl import psi
from research.vfl import session
from research.vfl import transport as transport_lib

PAPER_PAGE = "papers/vfl.md"
METHODS = ("encrypted", "plaintext", "centralized")
DATASETS = ("breast_cancer", "synthetic")


def config_schema() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "dataset": "breast_cancer",
      "active_features": 10,          # breast cancer: the first 10 columns; the other 20 passive
      "synthetic_samples": 20_000,    # the synthetic set: active 20 + passive 200 features
      "synthetic_active_features": 20,
      "synthetic_passive_features": 200,
      "id_coverage": 0.9,             # each party holds this random share of the sample IDs
      "test_fraction": 0.3,           # of the aligned samples
      "methods": ("encrypted", "plaintext", "centralized"),
      "num_seeds": 1,
      "epochs": 6,
      "batch_size": 64,
      "max_train_batches": 0,         # > 0: cut each epoch to this many batches (benchmarks)
      "max_eval_batches": 0,          # > 0: evaluate on this many test batches only
      "eval_every": 1,
      "learning_rate": 0.01,          # Adam: bottoms, the active interaction weight, the top
      "interaction_learning_rate": 0.1,  # SGD: the passive interaction weight W_p
      "network": {"bottom_hidden": 16, "passive_out": 4, "active_out": 4,
                  "interaction_out": 4, "top_hidden": 8},
      "he": {"key_bits": 2048, "frac_bits": 32, "max_abs": 32768.0, "mask_bits": 128,
             "noise_scale": 0.1,
             # K fixed-point values per Paillier plaintext (research/vfl/he.py: Slots): fewer
             # encryptions, re-randomizations and decryptions, the same results bit for bit
             "packing": True,
             "workers": 2},               # processes for Paillier work per run (1: in process)
      # tls_dir: ca.pem, <role>.pem, <role>.key per party (transport.make_certificates makes
      # them); "" with tls: a fresh CA for the job in the machine's temp dir (local processes).
      "grpc": {"tls": True, "tls_dir": "", "timeout": 600.0},
      # --processes 2 only: each party's private seed (active, passive). -1, the default: drawn
      # from the OS in that party's process, as a deployment must (with a seed both know, the
      # active party could recompute e_acc and the passive party W'_0, and so W_p). Set both
      # only to reproduce a run (the test compares with the one-process run of the same seed).
      "party_seeds": (-1, -1),
      "max_auc_gap": 0.01,            # goal: encrypted AUC within this of centralized (mean)
  })


def validate_config(config) -> None:
  config_lib.check_choice(config, "dataset", DATASETS)
  for method in config.methods:
    if method not in METHODS:
      raise config_lib.ConfigError(f"config key 'methods': got {method!r}, expected some of "
                                   f"{METHODS}")
  if not config.methods:
    raise config_lib.ConfigError("config key 'methods': expected at least one method")
  config_lib.check_positive(config, "num_seeds", "epochs", "batch_size", "eval_every",
                            "learning_rate", "interaction_learning_rate")
  if not 0 < config.id_coverage <= 1:
    raise config_lib.ConfigError(f"config key 'id_coverage': got {config.id_coverage}, "
                                 "expected 0 < value <= 1")
  if not 0 < config.test_fraction < 1:
    raise config_lib.ConfigError(f"config key 'test_fraction': got {config.test_fraction}, "
                                 "expected 0 < value < 1")
  if config.dataset == "breast_cancer" and not 1 <= config.active_features < 30:
    raise config_lib.ConfigError(f"config key 'active_features': got {config.active_features}, "
                                 "expected 1..29 (breast cancer has 30 features)")
  if config.he.key_bits < 512 or config.he.key_bits % 8:
    raise config_lib.ConfigError(f"config key 'he.key_bits': got {config.he.key_bits}, expected "
                                 "a multiple of 8, at least 512 (2048 for reported figures)")
  if config.he.workers < 1:
    raise config_lib.ConfigError(f"config key 'he.workers': got {config.he.workers}, "
                                 "expected >= 1")
  if config.he.mask_bits < 1:
    raise config_lib.ConfigError(f"config key 'he.mask_bits': got {config.he.mask_bits}, "
                                 "expected >= 1 (the one-time masks' bits; 0 would reveal the "
                                 "sums they hide)")
  if not config.he.noise_scale >= 0:
    raise config_lib.ConfigError(f"config key 'he.noise_scale': got {config.he.noise_scale}, "
                                 "expected >= 0 (0 turns the noise rho off)")
  if config.dataset == "synthetic":
    config_lib.check_positive(config, "synthetic_samples", "synthetic_active_features",
                              "synthetic_passive_features")
  seeds = tuple(config.party_seeds)
  if len(seeds) != 2 or not all(isinstance(s, int) and s >= -1 for s in seeds):
    raise config_lib.ConfigError(f"config key 'party_seeds': got {seeds}, expected (active, "
                                 "passive) seeds: ints >= 0, or -1 to draw one from the OS")


# --- data: two parties' tables under their own ID lists --------------------------------------------


def party_tables(config, seed: int = 0) -> dict[str, Any]:
  """The active table (ids, features, labels) and the passive one (ids, features), each party
  holding a seeded random `id_coverage` share of the samples in its own order; each party
  standardizes its own columns (no shared statistics)."""
  if config.dataset == "breast_cancer":
    from sklearn.datasets import load_breast_cancer  # pylint: disable=import-outside-toplevel
    x, y = load_breast_cancer(return_X_y=True)
    active_x, passive_x = x[:, :config.active_features], x[:, config.active_features:]
  else:
    from sklearn.datasets import make_classification  # pylint: disable=import-outside-toplevel
    width = config.synthetic_active_features + config.synthetic_passive_features
    x, y = make_classification(n_samples=config.synthetic_samples, n_features=width,
                               n_informative=width // 4, n_redundant=width // 8, n_classes=2,
                               class_sep=0.8, flip_y=0.02, random_state=seed)
    active_x, passive_x = x[:, :config.synthetic_active_features], \
        x[:, config.synthetic_active_features:]
  ids = np.array([f"id-{i:06d}" for i in range(len(y))])
  rng = np.random.default_rng([seed, 11])
  keep = max(1, int(round(config.id_coverage * len(y))))
  active_rows, passive_rows = rng.permutation(len(y))[:keep], rng.permutation(len(y))[:keep]

  def standardize(a):
    return ((a - a.mean(0)) / (a.std(0) + 1e-8)).astype(np.float32)

  return {"active": (list(ids[active_rows]), standardize(active_x[active_rows]),
                     y[active_rows].astype(np.int32)),
          "passive": (list(ids[passive_rows]), standardize(passive_x[passive_rows]))}


def align(ids: list, features: np.ndarray, aligned_ids: list, labels=None):
  where = {v: i for i, v in enumerate(ids)}
  rows = np.array([where[v] for v in aligned_ids], dtype=int)
  return (features[rows],) + ((labels[rows],) if labels is not None else ())


def network_spec(config, tables) -> model_lib.NetworkSpec:
  return model_lib.NetworkSpec(passive_features=tables["passive"][1].shape[1],
                               active_features=tables["active"][1].shape[1],
                               **config.network.to_dict())


def make_protocol(config, spec, network, num_aligned: int, seed: int) -> parties.Protocol:
  train_rows, test_rows = parties.split_rows(num_aligned, config.test_fraction, seed)
  batches = parties.schedule(train_rows, test_rows, epochs=config.epochs,
                             batch_size=config.batch_size, seed=seed,
                             eval_every=config.eval_every,
                             max_train_batches=config.max_train_batches,
                             max_eval_batches=config.max_eval_batches)
  return parties.Protocol(spec, network, model_lib.optimizers(
      config.learning_rate, config.interaction_learning_rate), batches,
      codec=he.FixedPoint(config.he.frac_bits, config.he.max_abs),
      mask_bits=config.he.mask_bits, noise_scale=config.he.noise_scale,
      packing=config.he.packing)


# --- metrics -----------------------------------------------------------------------------------------


def eval_metrics(eval_logits: tuple, labels: np.ndarray) -> dict[int, dict[str, float]]:
  """Test AUC and accuracy per round from the active party's (round, rows, logits) records."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=import-outside-toplevel
  by_round: dict[int, tuple[list, list]] = {}
  for round_, rows, logits in eval_logits:
    rows_seen, scores = by_round.setdefault(round_, ([], []))
    rows_seen += list(rows)
    scores += list(np.asarray(logits, np.float64))
  out = {}
  for round_, (rows, scores) in sorted(by_round.items()):
    truth, scores = labels[rows], np.array(scores)
    out[round_] = {"auc": float(roc_auc_score(truth, scores)),
                   "accuracy": float(np.mean((scores > 0) == (truth == 1)))}
  return out


class EpochClock:
  """Training seconds per round (eval batches excluded) and bytes per (phase, round)."""

  def __init__(self):
    self.train_seconds: dict[int, float] = {}
    self.train_batches: list[tuple[float, int]] = []  # (seconds, rows) per train batch
    self.bytes: dict[tuple[str, int], int] = {}
    self.last = time.perf_counter()

  def observe(self, receiver: str, message: msg.Message, size: int) -> None:
    del receiver
    key = (message.phase, message.round)
    self.bytes[key] = self.bytes.get(key, 0) + size

  def after_batch(self, batch: parties.Batch, *_states) -> None:
    now = time.perf_counter()
    if batch.phase == "train":
      self.train_seconds[batch.round] = self.train_seconds.get(batch.round, 0.0) + now - self.last
      self.train_batches.append((now - self.last, len(batch.rows)))
    self.last = now


def _pool(config):
  if config.he.workers <= 1:
    return he.Engine()
  # spawn: the workers import only research.vfl.he (numpy + phe), never a forked jax runtime.
  return he.Engine(concurrent.futures.ProcessPoolExecutor(
      config.he.workers, mp_context=multiprocessing.get_context("spawn")), config.he.workers)


# --- the three methods, one process ----------------------------------------------------------------


def train_split(config, run, protocol, init, aligned, *, encrypted: bool, seed: int,
                engine: he.Engine, label: str) -> dict[str, Any]:
  passive_ids, passive_x, active_ids, active_x, labels = aligned
  clock = EpochClock()
  start = time.perf_counter()
  passive, active = parties.initial_states(
      protocol, init, passive_ids=passive_ids, passive_x=passive_x, active_ids=active_ids,
      active_x=active_x, labels=labels, key_bits=config.he.key_bits if encrypted else None,
      noise_seed=passive_noise_seed(seed))
  setup_seconds = time.perf_counter() - start
  logged = [0]

  def after_batch(batch, passive_now, active_now):
    clock.after_batch(batch)
    if batch.phase == "train" and len(active_now.losses) > logged[0]:
      logged[0] = len(active_now.losses)
      run.log(len(active_now.losses), **{f"{label}_loss": active_now.losses[-1][2]})

  clock.last = time.perf_counter()
  passive, active, traffic = session.run_in_process(
      protocol, passive, active, passive_engine=engine, active_engine=engine,
      observe=clock.observe, after_batch=after_batch)
  result = _method_result(protocol, active, clock, traffic, labels,
                          setup_seconds=setup_seconds,
                          w_passive_true=(parties.effective_w_passive(protocol, passive, active)
                                          if encrypted else None))
  if encrypted and protocol.packing:
    slots = parties.packing_slots(protocol, passive.public_key)
    result.update(packing_slots=slots.count, slot_bits=slots.width)
  return result


def _method_result(protocol, active, clock, traffic, labels, *, setup_seconds: float,
                   w_passive_true=None) -> dict[str, Any]:
  metrics = eval_metrics(active.eval_logits, labels)
  last = max(metrics)
  train_samples = {}
  for batch in protocol.schedule:
    if batch.phase == "train":
      train_samples[batch.round] = train_samples.get(batch.round, 0) + len(batch.rows)
  rounds = sorted(train_samples)
  train_bytes = [clock.bytes.get(("train", r), 0) for r in rounds]
  result = {
      "auc": metrics[last]["auc"], "accuracy": metrics[last]["accuracy"],
      "curve": {str(r): m for r, m in metrics.items()},
      "losses": [float(l) for _, _, l in active.losses],
      # the median epoch: the first one also compiles the jax steps
      "seconds_per_epoch": float(np.median([clock.train_seconds.get(r, 0.0) for r in rounds])),
      "train_batches": [[round(t, 4), n] for t, n in clock.train_batches],
      "setup_seconds": round(setup_seconds, 3),
      "bytes_per_epoch": float(np.mean(train_bytes)) if rounds else 0.0,
      "bytes_per_sample": float(sum(train_bytes) / sum(train_samples.values())) if rounds else 0.0,
      "train_samples_per_epoch": int(np.mean([train_samples[r] for r in rounds])),
  }
  if traffic is not None:
    result["bytes_by_message"] = {f"{s}:{k}": v for (s, k), v in sorted(traffic.bytes.items())}
  if w_passive_true is not None:
    result["w_passive_norm"] = float(np.linalg.norm(w_passive_true))
  return result


def train_centralized(config, run, protocol, init, aligned) -> dict[str, Any]:
  _, passive_x, _, active_x, labels = aligned
  net, opt = protocol.network, protocol.optimizers
  params = {"passive_bottom": init.passive_bottom, "active": init.active,
            "w_passive": jax.numpy.asarray(init.w_passive)}

  def step(params, opt_state, xp, xa, y):
    loss, _, grads = model_lib.centralized_step(net, params, xp, xa, y)
    dense = {k: params[k] for k in ("passive_bottom", "active")}
    dense, dense_state = model_lib.apply_updates(
        opt.dense, dense, opt_state[0], {k: grads[k] for k in dense})
    w, w_state = model_lib.apply_updates(opt.interaction, params["w_passive"], opt_state[1],
                                         grads["w_passive"])
    return dict(dense, w_passive=w), (dense_state, w_state), loss

  step = jax.jit(step)
  logits_fn = jax.jit(lambda p, xp, xa: model_lib.centralized_logits(net, p, xp, xa))
  opt_state = (opt.dense.init({k: params[k] for k in ("passive_bottom", "active")}),
               opt.interaction.init(params["w_passive"]))
  clock, losses, eval_logits = EpochClock(), [], []
  for batch in protocol.schedule:
    rows = list(batch.rows)
    if batch.phase == "train":
      params, opt_state, loss = step(params, opt_state, passive_x[rows], active_x[rows],
                                     labels[rows])
      losses.append((batch.round, batch.step, float(loss)))
      run.log(len(losses), centralized_loss=losses[-1][2])
    else:
      eval_logits.append((batch.round, batch.rows,
                          np.asarray(logits_fn(params, passive_x[rows], active_x[rows]))))
    clock.after_batch(batch)
  active = parties.ActiveState((), active_x, labels, {}, None, None, None,
                               losses=tuple(losses), eval_logits=tuple(eval_logits))
  return _method_result(protocol, active, clock, None, labels, setup_seconds=0.0)


def run_seed(config, run, tables, seed: int, engine: he.Engine) -> dict[str, Any]:
  start = time.perf_counter()
  passive_ids, active_ids = (sorted(ids) for ids in psi.intersect_locally(
      tables["passive"][0], tables["active"][0], seed=seed))
  psi_seconds = time.perf_counter() - start
  (passive_x,) = align(tables["passive"][0], tables["passive"][1], passive_ids)
  active_x, labels = align(tables["active"][0], tables["active"][1], active_ids,
                           tables["active"][2])
  aligned = (passive_ids, passive_x, active_ids, active_x, labels)
  spec = network_spec(config, tables)
  network, init = model_lib.build(spec, seed)
  protocol = make_protocol(config, spec, network, len(active_ids), seed)
  results: dict[str, Any] = {}
  if "encrypted" in config.methods:
    results["encrypted"] = train_split(config, run, protocol, init, aligned, encrypted=True,
                                       seed=seed, engine=engine, label="encrypted")
  # The baselines start from the encrypted run's true initial W_p (W'_0 + e_acc_0), so all
  # three methods start from one set of weights.
  if "encrypted" in config.methods:
    init = init._replace(w_passive=parties.initial_w_passive(protocol, init,
                                                             passive_noise_seed(seed)))
  if "plaintext" in config.methods:
    results["plaintext"] = train_split(config, run, protocol, init, aligned, encrypted=False,
                                       seed=seed, engine=he.Engine(), label="plaintext")
  if "centralized" in config.methods:
    results["centralized"] = train_centralized(config, run, protocol, init, aligned)
  return {"seed": seed, "aligned_samples": len(active_ids), "psi_seconds": round(psi_seconds, 3),
          "active_ids": len(tables["active"][0]), "passive_ids": len(tables["passive"][0]),
          "methods": results}


def passive_noise_seed(seed: int) -> int:
  """The passive party's noise seed (its e_acc and rho draws) from its private seed; the
  one-process run, which simulates both parties, uses the run's `seed`."""
  return seed + 1000


def summarize(config, seeds: list[dict[str, Any]]) -> dict[str, Any]:
  methods = {}
  for method in config.methods:
    per_seed = [s["methods"][method] for s in seeds]
    methods[method] = {
        "auc_by_seed": [r["auc"] for r in per_seed],
        "auc_mean": float(np.mean([r["auc"] for r in per_seed])),
        "auc_std": float(np.std([r["auc"] for r in per_seed])),
        "accuracy_mean": float(np.mean([r["accuracy"] for r in per_seed])),
        "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in per_seed])),
        "bytes_per_epoch": float(np.mean([r["bytes_per_epoch"] for r in per_seed])),
        "bytes_per_sample": float(np.mean([r["bytes_per_sample"] for r in per_seed])),
    }
  return methods


def plot(run, config, seeds) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
  first = seeds[0]["methods"]
  for method, result in first.items():
    left.plot(np.arange(1, len(result["losses"]) + 1), result["losses"], label=method,
              lw=1.2, ls={"encrypted": "-", "plaintext": "--", "centralized": ":"}[method])
    rounds = sorted(int(r) for r in result["curve"])
    right.plot(rounds, [result["curve"][str(r)]["auc"] for r in rounds], marker="o",
               label=method)
  left.set(xlabel="training step", ylabel="training loss (batch)",
           title=f"{config.dataset}, seed {seeds[0]['seed']}")
  right.set(xlabel="epoch", ylabel="test AUC")
  left.legend()
  right.legend()
  figure.tight_layout()
  run.save_figure("loss", figure)
  plt.close(figure)


def run(config, run_ctx) -> dict[str, Any]:
  if jax.process_count() == 2:
    return run_party(config, run_ctx)
  if jax.process_count() != 1:
    raise config_lib.ConfigError(f"vfl runs as 1 process or 2 (--processes 2), not "
                                 f"{jax.process_count()}")
  engine = _pool(config) if "encrypted" in config.methods else he.Engine()
  try:
    seeds = []
    tables = party_tables(config)  # the data do not change with the seed
    for seed in range(config.seed, config.seed + config.num_seeds):
      seeds.append(run_seed(config, run_ctx, tables, seed, engine))
      encrypted = seeds[-1]["methods"].get("encrypted")
      if encrypted:
        print(f"seed {seed}: encrypted AUC {encrypted['auc']:.4f}, "
              f"{encrypted['seconds_per_epoch']:.1f} s/epoch", flush=True)
  finally:
    if engine.pool is not None:
      engine.pool.shutdown()
  methods = summarize(config, seeds)
  plot(run_ctx, config, seeds)
  return _summary(config, seeds, methods)


def _summary(config, seeds, methods) -> dict[str, Any]:
  main = "encrypted" if "encrypted" in methods else config.methods[0]
  base = "centralized" if "centralized" in methods else main
  gap = methods[main]["auc_mean"] - methods[base]["auc_mean"]
  length = (f"{config.max_train_batches} batch(es) of {config.batch_size}"
            if config.max_train_batches else f"{config.epochs} epoch(s)")
  note = (f"{config.dataset}, {len(seeds)} seed(s), {length}, {config.he.key_bits}-bit "
          f"Paillier; AUC gap {gap:+.4f}")
  return {
      "dataset": config.dataset, "seeds": seeds, "methods": methods,
      "auc_gap": gap, "within_goal": bool(abs(gap) <= config.max_auc_gap),
      "headline": {"metric": f"{main} test AUC", "value": methods[main]["auc_mean"],
                   "baseline": f"{base} test AUC", "baseline_value": methods[base]["auc_mean"],
                   "note": note},
  }


# --- two processes over gRPC ---------------------------------------------------------------------


def _exchange_addresses(address: str) -> list[str]:
  """Every process's gRPC address, gathered over the jax.distributed job."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  raw = np.zeros(64, np.uint8)
  raw[:len(address)] = np.frombuffer(address.encode(), np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(raw))
  return [bytes(row).rstrip(b"\0").decode() for row in gathered.reshape(-1, 64)]


def run_party(config, run_ctx) -> dict[str, Any]:
  """One party per process: process 0 active, process 1 passive; PSI then the encrypted or
  plaintext protocol over gRPC (mutual TLS when grpc.tls)."""
  if len(config.methods) != 1 or config.methods[0] == "centralized":
    raise config_lib.ConfigError("config key 'methods': with --processes 2 give exactly one of "
                                 "('encrypted',) or ('plaintext',)")
  role = ("active", "passive")[jax.process_index()]
  seed = config.seed
  tables = party_tables(config)
  tls = None
  if config.grpc.tls:
    from pathlib import Path  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    folder = Path(config.grpc.tls_dir) if config.grpc.tls_dir else None
    if folder is None:  # a fresh test CA for this job, on this machine (local processes only)
      import tempfile  # pylint: disable=import-outside-toplevel
      folder = Path(tempfile.gettempdir()) / f"meshwork-vfl-tls-{_job_token()}"
      if role == "active":
        transport_lib.make_certificates(folder)
      multihost_utils.sync_global_devices("vfl certificates")
    tls = transport_lib.TlsFiles(folder / "ca.pem", folder / f"{role}.pem", folder / f"{role}.key")
  channel = transport_lib.GrpcTransport("127.0.0.1:0", tls=tls, name=role,
                                        timeout=config.grpc.timeout)
  try:
    addresses = _exchange_addresses(channel.address)
    channel.connect(addresses[1 - jax.process_index()])
    return _party_main(config, run_ctx, role, seed, tables, channel)
  finally:
    channel.close()


def _job_token() -> str:
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  token = np.array([np.random.default_rng().integers(0, 2**31)], np.int64)
  return str(int(np.asarray(multihost_utils.broadcast_one_to_all(token))[0]))


def _party_main(config, run_ctx, role, seed, tables, channel) -> dict[str, Any]:
  ids = tables[role][0]
  state, round1 = psi.start(ids)
  channel.send(msg.encode(msg.PsiBlinded("setup", 0, 0, _points(round1))))
  peer_round1 = _unpoints(_expect(channel, msg.PsiBlinded, config).points)
  channel.send(msg.encode(msg.PsiReblinded("setup", 0, 1, _points(psi.reblind(state,
                                                                               peer_round1)))))
  own_reblinded = _unpoints(_expect(channel, msg.PsiReblinded, config).points)
  # Both parties hold the same intersection: sorted by ID, the rows match and do not depend on
  # the PSI's random keys (the run is reproducible from the seed).
  aligned_ids = sorted(psi.finish(state, own_reblinded, peer_round1))
  spec = network_spec(config, tables)
  # The schedule (batches, their order) is public and comes from the shared seed; each party's
  # initial weights and the passive party's noise come from its own private seed.
  network, init, noise_seed = party_init(config, spec, role)
  protocol = make_protocol(config, spec, network, len(aligned_ids), seed)
  encrypted = config.methods[0] == "encrypted"
  key_bits = config.he.key_bits if encrypted else None
  engine = _pool(config) if encrypted else he.Engine()
  clock = EpochClock()
  try:
    if role == "passive":
      (x,) = align(ids, tables["passive"][1], aligned_ids)
      passive = parties.initial_passive(protocol, init, ids=aligned_ids, x=x, key_bits=key_bits,
                                        noise_seed=noise_seed)
      session.run_passive(protocol, passive, channel, engine=engine,
                          timeout=config.grpc.timeout)
      return {"role": role, "headline": {"metric": "passive party", "value": 0.0,
                                         "baseline": "-", "baseline_value": 0.0}}
    x, labels = align(ids, tables["active"][1], aligned_ids, tables["active"][2])
    active = parties.initial_active(protocol, init, ids=aligned_ids, x=x, labels=labels,
                                    encrypted=encrypted)
    clock.last = time.perf_counter()
    active = session.run_active(protocol, active, channel, engine=engine,
                                timeout=config.grpc.timeout, observe=clock.observe,
                                after_batch=lambda b, s: clock.after_batch(b))
  finally:
    if engine.pool is not None:
      engine.pool.shutdown()
  result = _method_result(protocol, active, clock, None, labels, setup_seconds=0.0)
  result["bytes_sent"], result["bytes_received"] = channel.bytes_sent, channel.bytes_received
  seeds = [{"seed": seed, "aligned_samples": len(aligned_ids), "active_ids": len(ids),
            "methods": {config.methods[0]: result}, "transport": "grpc",
            "tls": bool(config.grpc.tls)}]
  methods = summarize(config, seeds)
  plot(run_ctx, config, seeds)
  return _summary(config, seeds, methods)


def party_init(config, spec, role: str):
  """(network, initial state, noise seed) of `role` in the two-process run, from its private
  seed (`party_seeds`; -1: 128 bits from the OS's CSPRNG). The party uses only its own parts of
  the state. A jax key takes 32 bits of a seed, so with a drawn seed the weight that is a
  protocol secret, the active party's share W'_0 (whoever knows it and e_acc_0 knows W_p), is
  drawn from the whole seed; the passive party's e_acc and rho come from the noise seed, a
  numpy seed of any size."""
  given = int(config.party_seeds[("active", "passive").index(role)])
  seed = given if given >= 0 else secrets.randbits(128)
  network, init = model_lib.build(spec, seed % 2**31)
  if given < 0 and role == "active":
    init = init._replace(w_passive=model_lib.draw_w_passive(spec, np.random.default_rng(seed)))
  return network, init, passive_noise_seed(seed)


def _points(points: list[bytes]) -> np.ndarray:
  return np.frombuffer(b"".join(points), np.uint8).reshape(len(points), psi.POINT_BYTES).copy()


def _unpoints(array: np.ndarray) -> list[bytes]:
  return [bytes(row) for row in array]


def _expect(channel, kind, config):
  message = msg.decode(channel.recv(config.grpc.timeout))
  if not isinstance(message, kind):
    raise parties.ProtocolError(f"expected {kind.KIND}, got {message.KIND}")
  return message


# --- the paper page ------------------------------------------------------------------------------


def paper_tables(*results) -> dict[str, str]:
  """The page's tables from kept results: `results` (methods x AUC / accuracy / cost)."""
  from research.common import records  # pylint: disable=import-outside-toplevel
  rows = []
  for result in results:
    summary, config = result["summary"], result["config"]
    for method in [m for m in METHODS if m in summary["methods"]]:
      m = summary["methods"][method]
      seeds = [s["seed"] for s in summary["seeds"]]
      split = method != "centralized"  # centralized training sends nothing
      rows.append((config["dataset"], method, ", ".join(str(s) for s in seeds),
                   ", ".join(f"{a:.4f}" for a in m["auc_by_seed"]),
                   f"{m['auc_mean']:.4f} ± {m['auc_std']:.4f}", f"{m['accuracy_mean']:.4f}",
                   f"{m['seconds_per_epoch']:.3g}",
                   f"{m['bytes_per_epoch'] / 1e6:.3f}" if split else "-",
                   f"{m['bytes_per_sample']:,.0f}" if split else "-"))
  header = ("data", "method", "seeds", "test AUC per seed", "AUC mean ± std", "accuracy",
            "s / epoch", "MB / epoch", "bytes / sample")
  return {"results": records.write_markdown_table(header, rows)}
