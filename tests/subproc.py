"""The environment of the binaries the tests start: the test process's own, with the CPU
device count of the caller's choosing and the suite's compile flag.

Optimisation level 0 and no expensive LLVM passes: the suite's programs are small, so
their compile time, not their run time, is what the suite waits on (about half of it at
the default level; the LLVM flag takes 15-20% off what is left, and XLA:CPU's older loop
emitters compile a train step in about 60% of the time of the MLIR fusion emitters,
measured on a 2-layer MoE train step: 2.4 s instead of 4.0 s). Results stay within the
tests' tolerances; bitwise checks compare runs compiled the same way.
"""
import os

FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int = 1) -> str:
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def env(devices: int = 1, drop: tuple[str, ...] = ()) -> dict[str, str]:
  """os.environ with `devices` CPU devices, less the variables starting with `drop`."""
  out = {k: v for k, v in os.environ.items() if not (drop and k.startswith(drop))}
  out["XLA_FLAGS"] = xla_flags(devices)
  return out
