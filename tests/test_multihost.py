"""Multi-host: two real processes on localhost (CPU, gloo collectives) train like one;
process 0 alone writes metrics; orbax saves and restores across the two hosts; a host
loading an upcycled checkpoint reads only its own experts. Plus the
start-up plan (flags, environment, Cloud TPU) and the TPU pod launch command."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import hf_models
import subproc
from moe_jax import distributed, launch, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One worker of the run: a small MoE (8 experts, top-2) trained by the library loop on a
# fixed synthetic corpus; mesh expert=-1 spans every device of every process, so the
# expert all_to_all crosses processes.
WORKER = r"""
import sys
workdir, runs, n, pid, port, mesh_axis, upcycled, dense = sys.argv[1:9]
from moe_jax import distributed
distributed.initialize(f"127.0.0.1:{port}" if int(n) > 1 else None, int(n), int(pid))
import numpy as np
from moe_jax import sharding
from moe_jax.config import ModelConfig
from moe_jax.models import llama
from moe_jax.moe.config import MoeConfig
from moe_jax.train import loop, optim
moe = MoeConfig(num_experts=8, top_k=2, expert_dim=16, backend="dropless")
cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  ffn_dim=48, moe=moe)
rng = np.random.default_rng(0)
docs = [rng.integers(1, 64, rng.integers(20, 60)).astype(np.int32) for _ in range(64)]
mesh = sharding.make_mesh(**{mesh_axis: -1})
for seed, steps in enumerate(map(int, runs.split(","))):
  # a later run starts from other random params: the checkpoint must overwrite them all
  model = llama.create(cfg, seed=seed, mesh=mesh)
  lc = loop.LoopConfig(steps=steps, batch_size=8, seq_len=16, log_every=1, eval_every=100,
                       eval_batches=0, ckpt_every=2, keep=2)
  loop.train(model, docs, docs, lc, optim.OptimConfig(lr=3e-3, total_steps=4, warmup_steps=1),
             workdir, mesh=mesh)
if upcycled:  # a checkpoint with one item per expert matrix: which items does a host read?
  import json, os
  import orbax.checkpoint as ocp
  from moe_jax import checkpoint
  reads, restore = [], ocp.StandardCheckpointer.restore
  ocp.StandardCheckpointer.restore = lambda self, item, *a, **k: (
      reads.append(os.path.basename(item)), restore(self, item, *a, **k))[1]
  got = checkpoint.load(upcycled, mesh)
  want = np.load(upcycled + ".npz")
  for name in ("w_gate", "w_up", "w_down"):
    for layer in range(cfg.n_layers):
      for shard in getattr(got.layers[layer].mlp, name)[...].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[f"{layer}.{name}"][shard.index])
  with open(os.path.join(workdir, f"reads_{pid}.json"), "w") as f:
    json.dump(sorted(r for r in reads if ".expert_" in r), f)
if dense:  # an upcycle on the fly, onto the mesh: which experts does a host build?
  import json, os
  from moe_jax.convert import load
  from moe_jax.stacked import ExpertStack
  from moe_jax.upcycle import convert, methods
  src, spec = load.open_source(dense), methods.UpcycleSpec("copy", 8, 2)
  want = convert.upcycle_model(src, spec)  # on one local device, everything built
  built, expert = [], ExpertStack.expert
  ExpertStack.expert = lambda self, e: (built.append(e), expert(self, e))[1]
  got = convert.upcycle_model(src, spec, mesh=mesh)
  for layer in range(src.cfg.n_layers):
    for name in ("w_gate", "w_up", "w_down", "router"):
      full = np.asarray(getattr(want.layers[layer].mlp, name)[...])
      for shard in getattr(got.layers[layer].mlp, name)[...].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
  with open(os.path.join(workdir, f"built_{pid}.json"), "w") as f:
    json.dump({"experts": sorted(set(built)), "builds": len(built)}, f)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, runs: str, n: int, devices: int, mesh_axis: str, upcycled: str = "",
            dense: str = "") -> list:
  """`n` worker processes with `devices` CPU devices each; `runs` = '2,4': train to step 2,
  then in the same processes from fresh params to step 4 (restoring step 2)."""
  env = subproc.env(devices, drop=("MOE_JAX_", "TPU_"))
  port = _free_port()
  return [subprocess.Popen([sys.executable, "-c", WORKER, str(workdir), runs, str(n),
                            str(pid), str(port), mesh_axis, upcycled, dense], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for pid in range(n)]


def _wait(procs) -> None:
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]


def _rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _upcycled_checkpoint(path: str) -> None:
  """A checkpoint laid out as the streaming upcycler writes it (one item per expert
  matrix), and its expert weights as `path`.npz."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from moe_jax import checkpoint
  from moe_jax.config import ModelConfig
  from moe_jax.models import llama
  from moe_jax.moe.config import MoeConfig
  from moe_jax.stacked import ExpertStack
  moe = MoeConfig(num_experts=8, top_k=2, expert_dim=16, backend="dropless")
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, ffn_dim=48, moe=moe)
  items = list(checkpoint.split_items(nnx.to_pure_dict(nnx.state(llama.create(cfg, seed=7)))))
  want = {}
  for name, tree in items[1:]:
    for k in ("w_gate", "w_up", "w_down"):
      want[f"{int(name[6:])}.{k}"] = w = np.asarray(tree["mlp"][k])
      tree["mlp"][k] = ExpertStack.of(list(w))
  checkpoint.write_items(path, cfg, iter(items))
  np.savez(path + ".npz", **want)


def test_two_processes_train_like_one(tmp_path):
  ref, multi = tmp_path / "one", tmp_path / "two"
  upcycled = str(tmp_path / "upcycled")
  _upcycled_checkpoint(upcycled)
  dense = str(tmp_path / "dense")
  hf_models.make_model("llama", num_hidden_layers=2).save_pretrained(dense)
  _wait(_launch(ref, "4", n=1, devices=1, mesh_axis="fsdp") +
        _launch(multi, "2,4", n=2, devices=2, mesh_axis="expert", upcycled=upcycled,
                dense=dense))
  want = {r["step"]: r["loss"] for r in _rows(ref)}
  rows = _rows(multi)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # process 0 alone writes metrics
  assert sorted(want) == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in rows], [want[s] for s in (1, 2, 3, 4)],
                             rtol=0, atol=1e-5)
  steps = sorted(int(d) for d in os.listdir(multi / "checkpoints") if d.isdigit())
  assert steps == [2, 4]
  data = os.listdir(multi / "checkpoints" / "4" / "data")  # grain: one state per process
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
  # expert axis over 4 devices, 2 per process: a host reads only its 4 experts' items
  for pid, experts in enumerate(((0, 1, 2, 3), (4, 5, 6, 7))):
    reads = json.loads((multi / f"reads_{pid}.json").read_text())
    assert reads == sorted(f"layer_{l:03d}.expert_{e:03d}.mlp.{k}" for l in range(2)
                           for e in experts for k in ("w_gate", "w_up", "w_down"))
    # upcycled on the fly (per-host online upcycling): a host builds only its 4 experts,
    # each once per expert matrix (2 layers x 3 matrices), never the whole MoE layer
    built = json.loads((multi / f"built_{pid}.json").read_text())
    assert built == {"experts": list(experts), "builds": 2 * 3 * 4}


def test_bad_distributed_flags_are_one_line(tmp_path):
  env = subproc.env(drop=("MOE_JAX_",))
  r = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
                      "--num_processes=2", "--coordinator=127.0.0.1:1"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip() == ("error: process_id: a multi-process run needs coordinator, "
                              "num_processes and process_id (flags or MOE_JAX_COORDINATOR/"
                              "MOE_JAX_NUM_PROCESSES/MOE_JAX_PROCESS_ID)")
  assert not (tmp_path / "run").exists()


def test_distributed_plan():
  plan = distributed.plan
  assert plan(env={}) == distributed.Plan("single")
  assert plan(num_processes=1, env={}).kind == "single"
  assert plan("h:1", 2, 1, env={}) == distributed.Plan("explicit", "h:1", 2, 1)
  env = {"MOE_JAX_COORDINATOR": "10.0.0.2:9999", "MOE_JAX_NUM_PROCESSES": "4",
         "MOE_JAX_PROCESS_ID": "3"}
  assert plan(env=env) == distributed.Plan("explicit", "10.0.0.2:9999", 4, 3)
  assert plan(process_id=0, env=env).process_id == 0  # flags win over the environment
  assert plan(env={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}).kind == "auto"
  assert plan(env={"TPU_WORKER_HOSTNAMES": "localhost"}).kind == "single"  # one-host TPU VM
  assert plan(env={"MEGASCALE_COORDINATOR_ADDRESS": "c:1"}).kind == "auto"
  assert plan("auto", env={}).kind == "auto"
  for args, msg in ((("h:1", 2, 2), "process_id=2: expected 0 <= process_id < num_processes=2"),
                    (("h", 2, 0), "coordinator='h': expected host:port"),
                    ((None, 2, 0), "coordinator: a multi-process run needs")):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
      plan(*args, env={})
  with pytest.raises(ValueError, match="MOE_JAX_NUM_PROCESSES='two': expected an integer"):
    plan(env={"MOE_JAX_NUM_PROCESSES": "two"})
  assert distributed.initialize(env={}).kind == "single"  # no-op: nothing initialised


@pytest.mark.parametrize("accelerator,chips,hosts,mesh", [
    ("v4-8", 4, 1, dict(data=1, fsdp=1, expert=4, tensor=1)),
    ("v4-32", 16, 4, dict(data=1, fsdp=2, expert=8, tensor=1)),
    ("v5p-32", 16, 4, dict(data=1, fsdp=2, expert=8, tensor=1)),
    ("v5p-128", 64, 16, dict(data=1, fsdp=8, expert=8, tensor=1)),
    ("v6e-8", 8, 1, dict(data=1, fsdp=1, expert=8, tensor=1)),
    ("v6e-16", 16, 4, dict(data=1, fsdp=2, expert=8, tensor=1)),
    ("v6e-256", 256, 64, dict(data=1, fsdp=32, expert=8, tensor=1)),
    ("v5litepod-16", 16, 4, dict(data=1, fsdp=2, expert=8, tensor=1)),
])
def test_tpu_slice_meshes(accelerator, chips, hosts, mesh):
  assert launch.chips(accelerator) == chips and launch.hosts(accelerator) == hosts
  assert launch.suggest_mesh(accelerator, num_experts=8) == mesh
  assert sharding.resolve_mesh_shape(chips, **mesh) == mesh  # fills the slice exactly


def test_tpu_slice_mesh_edge_cases():
  assert launch.suggest_mesh("v5p-32", num_experts=6) == dict(data=1, fsdp=8, expert=2,
                                                              tensor=1)
  assert launch.suggest_mesh("v5p-128", num_experts=64, tensor=4) == dict(
      data=1, fsdp=1, expert=16, tensor=4)
  for bad in ("v5p-33", "v7-8", "tpu"):
    with pytest.raises(ValueError, match=f"accelerator='{bad}'"):
      launch.chips(bad)


def test_tpu_pod_command():
  cmd = launch.train_command("gs://b/run", ["--config=configs/train.py:experts=8",
                                            "--config.init=/data/my ckpt"],
                             dict(data=1, fsdp=2, expert=8, tensor=1))
  assert cmd == ("cd ~/moe_jax && .venv/bin/python -m experiments.train --workdir=gs://b/run "
                 "--coordinator=auto --config.mesh.data=1 --config.mesh.fsdp=2 "
                 "--config.mesh.expert=8 --config.mesh.tensor=1 "
                 "--config=configs/train.py:experts=8 '--config.init=/data/my ckpt'")
  assert launch.gcloud_ssh("pod", "us-east5-a", cmd, project="p") == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-east5-a", "--worker=all",
      "--project=p", f"--command={cmd}"]


def test_launch_dry_run(capsys):
  assert launch.main(["--name=pod", "--zone=z", "--accelerator=v5p-32", "--experts=8",
                      "--workdir=gs://b/r", "--dry_run", "--", "--config.loop.steps=10"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all ")
  assert "--config.mesh.expert=8 --config.mesh.tensor=1 --config.loop.steps=10'" in out
  assert launch.main(["--name=pod", "--zone=z", "--accelerator=v5p-32", "--experts=8",
                      "--tensor=3", "--workdir=w", "--dry_run"]) == 1
