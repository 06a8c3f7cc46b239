"""Peak memory and time of the streaming upcycle on a synthetic dense checkpoint.

  python -m experiments.bench_upcycle --workdir=/tmp/bench_upcycle   # ~1.1B params, 8 experts
  python -m experiments.bench_upcycle --online --devices=8 --d=1024 --f=2816
  python -m experiments.bench_upcycle --online --devices=8 --param_dtype=bfloat16  # 1.1B

Writes a random Llama-shaped checkpoint (sharded safetensors, one shard per layer),
upcycles it in a child process and reports that process's own peak RSS (ru_maxrss from
os.wait4 on it) and wall time. --online upcycles on the fly onto a mesh (`axis` over
`devices` fake CPU devices), as `train --config.init=<dense>` does, with nothing written:
the child then holds the whole MoE in its devices' memory, which on CPU is its own, and
the bound printed is the dense model plus the experts plus 20%, in --param_dtype (the
MoE's params; the dense checkpoint is float32 either way).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from experiments import cli
from safetensors.numpy import save_file

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_upcycle", "Scratch directory.")
_D = flags.DEFINE_integer("d", 2048, "Model width.")
_F = flags.DEFINE_integer("f", 5632, "FFN width.")
_LAYERS = flags.DEFINE_integer("layers", 22, "Layers.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Experts.")
_METHOD = flags.DEFINE_string("method", "copy", "Upcycling method.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoints afterwards.")
_ONLINE = flags.DEFINE_bool("online", False, "Upcycle on the fly onto a mesh of fake devices.")
_DEVICES = flags.DEFINE_integer("devices", 8, "--online: fake CPU devices.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "--online: the MoE's param dtype.")
_AXIS = flags.DEFINE_enum("axis", "expert", ["expert", "fsdp"], "--online: the mesh axis over "
                          "the devices.")

# --online's child: the train binary's on-the-fly upcycle (init_plan.InitPlan.build).
ONLINE = """
import dataclasses
import sys
from moe_jax import sharding
from moe_jax.convert import load
from moe_jax.upcycle import convert, methods
src = load.open_source(sys.argv[1])
src = dataclasses.replace(src, cfg=src.cfg.replace(param_dtype=sys.argv[6]))
mesh = sharding.make_mesh(**{sys.argv[5]: int(sys.argv[2])})
model = convert.upcycle_model(src, methods.UpcycleSpec(sys.argv[3], int(sys.argv[4]), 2), mesh=mesh)
import jax
from flax import nnx
held = sum(s.data.nbytes for x in jax.tree.leaves(nnx.state(model)) for s in x.addressable_shards)
print(f"device_bytes={held}")
"""


def write_dense(path: str, d: int, f: int, layers: int, vocab: int) -> int:
  """A random llama checkpoint, one safetensors shard per layer; returns its param count."""
  os.makedirs(path, exist_ok=True)
  heads, kv, hd = d // 64, max(1, d // 512), 64
  rng = np.random.default_rng(0)
  rand = lambda *s: (rng.standard_normal(s, np.float32) * 0.02)
  weight_map, total = {}, 0
  shards = [{"model.embed_tokens.weight": rand(vocab, d), "model.norm.weight": np.ones(d, np.float32),
             "lm_head.weight": rand(vocab, d)}]
  for i in range(layers):
    p = f"model.layers.{i}."
    shards.append({p + "self_attn.q_proj.weight": rand(heads * hd, d),
                   p + "self_attn.k_proj.weight": rand(kv * hd, d),
                   p + "self_attn.v_proj.weight": rand(kv * hd, d),
                   p + "self_attn.o_proj.weight": rand(d, heads * hd),
                   p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                   p + "mlp.down_proj.weight": rand(d, f),
                   p + "input_layernorm.weight": np.ones(d, np.float32),
                   p + "post_attention_layernorm.weight": np.ones(d, np.float32)})
  for n, shard in enumerate(shards):
    name = f"model-{n:05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
    total += sum(v.size for v in shard.values())
    shards[n] = None
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"weight_map": weight_map}, fh)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump({"model_type": "llama", "vocab_size": vocab, "hidden_size": d,
               "intermediate_size": f, "num_hidden_layers": layers,
               "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
               "tie_word_embeddings": False}, fh)
  return total


def main(argv):
  del argv
  root = os.path.abspath(_WORKDIR.value)
  dense, moe = os.path.join(root, "dense"), os.path.join(root, "moe")
  shutil.rmtree(root, ignore_errors=True)
  # The dense checkpoint is written by a child too, so its memory is not counted below.
  n = subprocess.run([sys.executable, "-c", (
      "import sys; from experiments import bench_upcycle as b; "
      f"print(b.write_dense({dense!r}, {_D.value}, {_F.value}, {_LAYERS.value}, {_VOCAB.value}))")],
      check=True, capture_output=True, text=True).stdout.split()[-1]
  t0 = time.time()
  if _ONLINE.value:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={_DEVICES.value}"}
    child = subprocess.Popen([sys.executable, "-c", ONLINE, dense, str(_DEVICES.value),
                              _METHOD.value, str(_EXPERTS.value), _AXIS.value,
                              _PARAM_DTYPE.value], env=env,
                             stdout=subprocess.PIPE, text=True)
  else:
    child = subprocess.Popen([
        sys.executable, "-m", "experiments.upcycle",
        f"--config=configs/upcycle.py:method={_METHOD.value},experts={_EXPERTS.value}",
        f"--workdir={moe}", f"--config.source={dense}", "--config.eval_windows=0"])
  _, status, usage = os.wait4(child.pid, 0)
  child.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.time() - t0
  if child.returncode:
    raise SystemExit(f"experiments.upcycle exited with {child.returncode}")
  peak_kb = usage.ru_maxrss  # this child's own peak, in KiB on Linux
  print(f"dense_params={int(n)} experts={_EXPERTS.value} method={_METHOD.value}")
  if _ONLINE.value:
    ffn = 3 * _D.value * _F.value * _LAYERS.value
    width = {"float32": 4, "bfloat16": 2}[_PARAM_DTYPE.value]
    bound = 1.2 * width * (int(n) + _EXPERTS.value * ffn)  # dense + the local experts
    held = int(child.stdout.read().split("device_bytes=")[-1])
    print(f"online devices={_DEVICES.value} axis={_AXIS.value} param_dtype={_PARAM_DTYPE.value} "
          f"seconds={seconds:.1f}")
    print(f"bound_gb={bound / 2**30:.3f} (the dense model + the local experts, + 20%)")
    print(f"device_held_gb={held / 2**30:.3f} (every shard on the fake devices, replicas "
          "of the non-expert params included: on CPU they are all this process's memory)")
  else:
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(moe) for f in fs)
    print(f"moe_checkpoint_bytes={size} seconds={seconds:.1f}")
  print(f"peak_rss_gb={peak_kb / 2**20:.3f}")
  if not _KEEP.value:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
