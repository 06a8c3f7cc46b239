"""Multi-host start-up: one `jax.distributed.initialize` per process, before any device use.

Where the settings come from, first found wins:
1. arguments (the train binary's --coordinator, --num_processes, --process_id flags);
2. MOE_JAX_COORDINATOR, MOE_JAX_NUM_PROCESSES, MOE_JAX_PROCESS_ID;
3. coordinator "auto" (flag or MOE_JAX_COORDINATOR=auto), or a multi-host Cloud TPU
   environment (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing several hosts, or
   MEGASCALE_COORDINATOR_ADDRESS): `jax.distributed.initialize()` with no arguments,
   which reads the TPU metadata (also SLURM, Open MPI, Kubernetes);
4. none of these, or num_processes=1: nothing to do (one process).

Explicit settings on CPU use gloo collectives (XLA:CPU's cross-process all-reduce and
all-to-all), so a multi-process run works on one machine with localhost ports.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

ENV_COORDINATOR = "MOE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MOE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOE_JAX_PROCESS_ID"
TPU_HOST_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` does: 'single' (nothing), 'explicit' or 'auto'."""
  kind: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _int(value, name: str) -> int | None:
  if value in (None, ""):
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r}: expected an integer") from None


def _on_multihost_tpu(env: Mapping[str, str]) -> bool:
  hosts = next((env[k] for k in TPU_HOST_LISTS if env.get(k)), "")
  return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(
      env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def plan(coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, env: Mapping[str, str] | None = None) -> Plan:
  """The start-up `initialize` would do, from arguments and environment (pure)."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get(ENV_COORDINATOR) or None
  n = num_processes if num_processes is not None else _int(env.get(ENV_NUM_PROCESSES),
                                                           ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  if coordinator == "auto":
    return Plan("auto", num_processes=n, process_id=pid)
  if coordinator is None and n in (None, 1):
    return Plan("auto") if _on_multihost_tpu(env) else Plan("single")
  if n is not None and n < 1:
    raise ValueError(f"num_processes={n}: expected a positive integer")
  if n == 1 and pid in (None, 0):
    return Plan("single")
  if coordinator is None or n is None or pid is None:
    missing = [k for k, v in (("coordinator", coordinator), ("num_processes", n),
                              ("process_id", pid)) if v is None][0]
    raise ValueError(f"{missing}: a multi-process run needs coordinator, num_processes and "
                     f"process_id (flags or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/"
                     f"{ENV_PROCESS_ID})")
  if not 0 <= pid < n:
    raise ValueError(f"process_id={pid}: expected 0 <= process_id < num_processes={n}")
  if ":" not in coordinator:
    raise ValueError(f"coordinator={coordinator!r}: expected host:port")
  return Plan("explicit", coordinator, n, pid)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env: Mapping[str, str] | None = None) -> Plan:
  """Joins this process to the run (see the module docstring); call before using devices.
  Returns the plan it followed; a no-op for one process or when already initialised."""
  p = plan(coordinator, num_processes, process_id, env)
  if p.kind == "single" or jax.distributed.is_initialized():
    return p
  if p.kind == "auto":
    jax.distributed.initialize(num_processes=p.num_processes, process_id=p.process_id)
    return p
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(p.coordinator, num_processes=p.num_processes,
                             process_id=p.process_id)
  return p
