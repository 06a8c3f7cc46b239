"""TPU pod launch: the same train command on every worker of a Cloud TPU VM slice.

python -m moe_jax.launch --name=my-pod --zone=us-east5-a --accelerator=v5p-32 --experts=8 \
    --workdir=gs://bucket/run -- --config=configs/train.py:experts=8 --config.init=/ckpt

prints and runs `gcloud compute tpus tpu-vm ssh my-pod --zone=... --worker=all
--command='cd ~/moe_jax && .venv/bin/python -m experiments.train ... --coordinator=auto'`.
Each worker then joins the run through `jax.distributed.initialize()` (moe_jax/distributed.py,
coordinator 'auto': the TPU metadata names the hosts). The repository and its .venv must
already be on every worker (e.g. the same command with `git clone ... && make .venv`),
and the workdir must be shared (a gs:// bucket): orbax writes one checkpoint from all hosts.
The command assembly and the mesh suggestion are pure functions, tested without gcloud.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from moe_jax import sharding

# Generation -> how the number in the accelerator type counts: TensorCores (2 per chip on
# v4 and v5p) or chips (v5e, v6e); multi-host slices have 4 chips per host.
GENERATIONS = {"v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}
CHIPS_PER_HOST = 4


def chips(accelerator: str) -> int:
  """TPU chips of an accelerator type such as 'v5p-32' (16 chips) or 'v6e-16' (16)."""
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator)
  if not m or int(m.group(2)) % GENERATIONS[m.group(1)]:
    raise ValueError(f"accelerator={accelerator!r}: expected v4-N, v5p-N, v5litepod-N, v5e-N "
                     "or v6e-N")
  return int(m.group(2)) // GENERATIONS[m.group(1)]


def hosts(accelerator: str) -> int:
  """TPU VM workers of the slice (one JAX process each)."""
  n = chips(accelerator)
  single_host = 8 if accelerator.startswith(("v5litepod", "v5e", "v6e")) else CHIPS_PER_HOST
  return 1 if n <= single_host else n // CHIPS_PER_HOST


def suggest_mesh(accelerator: str, num_experts: int, tensor: int = 1) -> dict[str, int]:
  """Expert parallelism as wide as the experts and chips allow (largest common power of
  two), FSDP over the rest: expert all_to_alls stay within groups of `expert` chips and
  every chip holds E/expert experts."""
  n = chips(accelerator)
  if n % tensor:
    raise ValueError(f"mesh.tensor={tensor} does not divide the {n} chips of {accelerator}")
  expert = math.gcd(num_experts, n // tensor)
  expert = 1 << (expert.bit_length() - 1)  # a power of two: tori split evenly
  return {"data": 1, "fsdp": n // (tensor * expert), "expert": expert, "tensor": tensor}


def train_command(workdir: str, args: Sequence[str] = (), mesh: dict[str, int] | None = None,
                  repo_dir: str = "~/moe_jax", python: str = ".venv/bin/python") -> str:
  """The shell command each worker runs: the train binary with `coordinator=auto`."""
  parts = [python, "-m", "experiments.train", f"--workdir={workdir}", "--coordinator=auto"]
  parts += [f"--config.mesh.{a}={n}" for a, n in (mesh or {}).items()]
  parts += list(args)
  return f"cd {repo_dir} && " + " ".join(shlex.quote(p) for p in parts)


def gcloud_ssh(name: str, zone: str, command: str, project: str | None = None,
               worker: str = "all") -> list[str]:
  """argv of `gcloud compute tpus tpu-vm ssh` running `command` on `worker` (all)."""
  argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}",
          f"--worker={worker}"]
  if project:
    argv.append(f"--project={project}")
  return argv + [f"--command={command}"]


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(prog="python -m moe_jax.launch", description=__doc__.split("\n")[0])
  p.add_argument("--name", required=True, help="TPU VM name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project")
  p.add_argument("--accelerator", required=True, help="e.g. v5p-32, v6e-16, v4-32")
  p.add_argument("--workdir", required=True, help="shared by all hosts, e.g. gs://bucket/run")
  p.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
  p.add_argument("--tensor", type=int, default=1)
  p.add_argument("--repo_dir", default="~/moe_jax")
  p.add_argument("--dry_run", action="store_true", help="print the command only")
  a = p.parse_args(own)
  try:
    mesh = suggest_mesh(a.accelerator, a.experts, a.tensor)
    sharding.resolve_mesh_shape(chips(a.accelerator), **mesh)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  cmd = gcloud_ssh(a.name, a.zone, train_command(a.workdir, extra, mesh, a.repo_dir), a.project)
  print(" ".join(shlex.quote(c) for c in cmd))
  return 0 if a.dry_run else subprocess.call(cmd)


if __name__ == "__main__":
  sys.exit(main())
