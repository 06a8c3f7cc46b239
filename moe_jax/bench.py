"""Benchmarks measured side by side in one process (ratios, not absolute times)."""
from __future__ import annotations

import collections
import datetime
import glob
import os
import platform
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from moe_jax import generation
from moe_jax.config import ModelConfig
from moe_jax.convert import load
from moe_jax.models import layer_stack, layers, llama
from moe_jax.moe import attention as moa_lib
from moe_jax.moe import dispatch, layer
from moe_jax.moe.config import MoeConfig
from moe_jax.moe.routers import Routing
from moe_jax.train import flops, optim, step
from moe_jax.upcycle import convert, methods


def _time(fn, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU's model name as the kernel reports it ('' where it does not): ratios on CPU
  differ between hosts of the same core count (docs/benchmarks.md), so results name it."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def usable_cores() -> int:
  """The cores this process may run on: fewer than the machine's when pinned (taskset)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def provenance(binary: str) -> dict:
  """Where and how a benchmark's figures were made, for its --out JSON: the command (this
  process's flags), the machine (and the cores this process may run on, when pinned), the
  device, jax's version and the date."""
  cores, usable = os.cpu_count(), usable_cores()
  model = cpu_model()
  return {"command": f"python -m {binary} " + " ".join(sys.argv[1:]),
          "machine": f"{platform.machine()}" + (f" ({model})" if model else "") + ", " + (
              f"{cores} cores" if usable == cores else f"{usable} of {cores} cores (pinned)"),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": datetime.date.today().isoformat()}


def alternate(fns: dict, repeats: int) -> dict[str, float]:
  """Median seconds of each jitted fn, run alternately after one warm-up call each."""
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      times[name].append(_time(fn, args))
  return {name: float(np.median(v)) for name, v in times.items()}


def bench_moe(t: int, d: int, f: int, e: int, k: int, dtype: str, backend: str,
              capacity_factor: float, router: str, repeats: int,
              breakdown: bool = False) -> dict:
  """Median forward+backward seconds of the MoE layer and of a dense SwiGLU of width k*f,
  alternating in this process; returns both and their ratio (and with `breakdown`, each
  one's thunk_breakdown)."""
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=f, backend=backend, router=router,
                  capacity_factor=capacity_factor)
  dt = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(ks[0], (t, d), dt)
  router_w = jax.random.normal(ks[1], (d, e), jnp.float32) * d ** -0.5
  experts = [jax.random.normal(ks[i], s, dt) * s[-2] ** -0.5
             for i, s in ((2, (e, d, f)), (3, (e, d, f)), (4, (e, f, d)))]
  dense = [jax.random.normal(ks[i], s, dt) * s[-2] ** -0.5
           for i, s in ((5, (d, k * f)), (6, (d, k * f)), (7, (k * f, d)))]

  def moe_loss(x, *w):
    y, stats = layer.moe_forward(x, router_w, *w, cfg, dtype=dt)
    return jnp.sum(y.astype(jnp.float32)) + stats["aux_loss"]

  def dense_loss(x, *w):
    return jnp.sum(layers.swiglu(x, *w).astype(jnp.float32))

  # Compiled once: timed, and their temporary memory read off the same executables.
  fns = {name: (jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile(), args)
         for name, loss, args in (("moe", moe_loss, (x, *experts)),
                                  ("dense", dense_loss, (x, *dense)))}
  temp = {name: temp_bytes(fn) for name, (fn, _) in fns.items()}
  med = alternate(fns, repeats)
  ratio = med["moe"] / med["dense"]
  resolved = dispatch.resolve_backend(backend)
  backend = backend if resolved == backend else f"{backend}({resolved})"
  print(f"T={t} d={d} f={f} E={e} k={k} dtype={dtype} backend={backend} router={router} "
        f"capacity_factor={capacity_factor} device={jax.devices()[0].device_kind}")
  print(f"moe_fwd_bwd_s={med['moe']:.4f} dense_fwd_bwd_s={med['dense']:.4f}")
  print(f"moe_temp_mib={temp['moe'] / 2**20:.1f} dense_temp_mib={temp['dense'] / 2**20:.1f}")
  print(f"ratio={ratio:.3f}")
  figures = {"T": t, "d": d, "f": f, "E": e, "k": k, "dtype": dtype, "backend": backend,
             "moe_s": med["moe"], "dense_s": med["dense"], "ratio": ratio,
             "moe_temp_bytes": temp["moe"], "dense_temp_bytes": temp["dense"]}
  if breakdown:
    figures["breakdown"] = {name: thunk_breakdown(fn, args) for name, (fn, args) in fns.items()}
    print(" ".join(f"{name}_products_s={b['products_s']:.4f} {name}_rest_s={b['rest_s']:.4f}"
                   for name, b in figures["breakdown"].items()))
  return figures


THUNK_TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.+?\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def enable_thunk_trace() -> None:
  """Have XLA:CPU record each thunk (one compiled operation) in profiler traces, for
  thunk_breakdown. It sets XLA_FLAGS, which XLA reads once, when jax starts its backend."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(f"enable_thunk_trace: jax's backend has started; set XLA_FLAGS="
                       f"{THUNK_TRACE_FLAG} before it does")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {THUNK_TRACE_FLAG}".strip()


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction: (kind, op)} of a compiled module's text. kind: 'product' for a dot or a
  library fusion (kind=kCustom: the YNNPACK, XNNPACK or oneDNN fusions XLA:CPU hands its
  matmuls to), 'control' for while, conditional and call (whose bodies' instructions are
  thunks of their own), 'rest' otherwise; op: the jax operation its metadata names (the
  last part of op_name), else its HLO opcode."""
  ops = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    kind = ("product" if opcode == "dot" or (opcode == "fusion" and "kind=kCustom" in line)
            else "control" if opcode in ("while", "conditional", "call") else "rest")
    op_name = _OP_NAME.search(line)
    ops[name] = (kind, op_name.group(1).rsplit("/", 1)[-1] if op_name else opcode)
  return ops


def thunk_breakdown(compiled, args, calls: int = 3, top: int = 8) -> dict:
  """Seconds per call of a compiled function's thunks from a profiler trace (after
  enable_thunk_trace): its products, the rest, the rest's largest jax operations, and the
  traced calls' own time (wall_s), which the thunks should nearly fill.
  The thunks of a call add up to its time only when they run one after another, on one
  core: with more, they overlap, and XLA:CPU's Eigen matmuls finish after their thunk
  returns."""
  ops = hlo_ops(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(compiled(*args))
    wall = (time.perf_counter() - t0) / calls
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    trace = jax.profiler.ProfileData.from_file(path)
  kinds, rest = collections.Counter(), collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        kind, op = ops.get(event.name, ("", ""))
        seconds = event.duration_ns * 1e-9 / calls
        if kind == "product":
          kinds[kind] += seconds
        elif kind == "rest":
          kinds[kind] += seconds
          rest[op] += seconds
  if not kinds:
    raise RuntimeError(f"thunk_breakdown: no XLA:CPU thunk in the trace (XLA_FLAGS needs "
                       f"{THUNK_TRACE_FLAG} before jax starts: enable_thunk_trace)")
  return {"products_s": kinds["product"], "rest_s": kinds["rest"], "wall_s": wall,
          "rest_by_op": dict(rest.most_common(top))}


def temp_bytes(compiled) -> int:
  """The temporary buffers XLA allocates for one call of a compiled executable
  (memory_analysis: activations and workspace, not arguments or outputs)."""
  return int(compiled.memory_analysis().temp_size_in_bytes)


def strided_experts(t: int, k: int, num_experts: int) -> np.ndarray:
  """[T, K] experts: assignment a = t*k + j to expert a mod E. Every expert gets T*k/E
  tokens, but neighbouring experts the same ones (experts 0..E/k - 1 all take tokens t with
  t*k mod E = 0, ...): a block loop in expert order finds the rows of the block before."""
  return (np.arange(t * k) % num_experts).reshape(t, k).astype(np.int32)


def splits_into_bands(t: int, k: int, num_experts: int) -> bool:
  """Whether random_equal_experts can route T tokens: E a multiple of k, T of E/k."""
  return num_experts % k == 0 and t % (num_experts // k) == 0


def random_equal_experts(t: int, k: int, num_experts: int, seed: int = 0) -> np.ndarray:
  """[T, K] experts, every expert exactly T*k/E tokens and each token k distinct experts, the
  tokens of any two neighbouring experts disjoint random sets (as a router's are, not
  strided_experts' shared ones): the experts fall into k bands of E/k, and token t takes,
  in each band, the expert at perm[t] mod (E/k), perm a fixed random permutation."""
  if not splits_into_bands(t, k, num_experts):
    raise ValueError(f"random_equal_experts: E={num_experts} must be a multiple of k={k}, "
                     f"and T={t} of E/k")
  bands = num_experts // k
  r = np.random.default_rng(seed).permutation(t) % bands
  return (np.arange(k)[None, :] * bands + r[:, None]).astype(np.int32)


def _equal_groups_loop(experts_TxK: np.ndarray, num_experts: int, dtype):
  """loss(x_TxD, w_gate, w_up, w_down): dropless's block loop (`dispatch.grouped_swiglu`)
  on a routing that gives every expert exactly T*k/E assignments (`experts_TxK`, weight 1),
  its layout made here, outside the timed function: the layer's products, row moves and
  per-block costs with no router, no sort and no padding."""
  t, k = experts_TxK.shape
  routing = Routing(jnp.ones((t, k), dtype), jnp.asarray(experts_TxK), None)
  slots = dispatch.sort_slots(routing, num_experts)
  levels = dispatch.block_levels(t * k, num_experts)
  w_R, src_R, loop = dispatch.grouped_layout(slots, jnp.ones((t * k,), dtype), num_experts, k,
                                             levels, t, dtype)
  return lambda x, *w: jnp.sum(dispatch.grouped_swiglu(x, w_R, *w, src_R, loop, levels).astype(
      jnp.float32))


def bench_floor(t: int, d: int, f: int, e: int, k: int, dtype: str, repeats: int) -> dict:
  """What the expert shapes alone cost on this device, with no router and no permutation:
  the E experts' SwiGLU on T*k rows already grouped into E equal [T*k/E, d] slabs (E
  separate SwiGLUs, each its own matmuls) against the dense SwiGLU of width k*f, both
  forward only and forward+backward, alternating. Equal FLOPs; a ratio above 1 is the
  price of the narrower products (d -> f instead of d -> k*f), which no dispatch removes.
  Also forward+backward of dropless's block loop on T*k rows in E equal groups
  (`_equal_groups_loop`), the layer with its routing, sort and padding taken out: `loop` on
  strided_experts' routing (neighbouring experts share their tokens, so each block finds
  its rows in cache) and, where E is a multiple of k, `loop_random` on
  random_equal_experts' (they do not, as with a router)."""
  dt = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.key(1), 8)
  c = t * k // e
  x = jax.random.normal(ks[0], (t, d), dt)
  x_grouped = jax.random.normal(ks[1], (e, c, d), dt)
  experts = [jax.random.normal(ks[i], s, dt) * s[-2] ** -0.5
             for i, s in ((2, (e, d, f)), (3, (e, d, f)), (4, (e, f, d)))]
  dense = [jax.random.normal(ks[i], s, dt) * s[-2] ** -0.5
           for i, s in ((5, (d, k * f)), (6, (d, k * f)), (7, (k * f, d)))]
  floor = lambda x, *w: sum(jnp.sum(layers.swiglu(x[i], *(p[i] for p in w)).astype(
      jnp.float32)) for i in range(e))
  # One array per expert and slab: gradients need no stacking (which XLA:CPU does as E
  # full-size adds).
  experts, x_grouped = [list(p) for p in experts], list(x_grouped)
  dense_fn = lambda x, *w: jnp.sum(layers.swiglu(x, *w).astype(jnp.float32))
  grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))
  stacked = (x, *(jnp.stack(p) for p in experts))
  fns = {"floor_fwd": (jax.jit(floor), (x_grouped, *experts)),
         "dense_fwd": (jax.jit(dense_fn), (x, *dense)),
         "floor": (grad(floor), (x_grouped, *experts)),
         "loop": (grad(_equal_groups_loop(strided_experts(t, k, e), e, dt)), stacked),
         "dense": (grad(dense_fn), (x, *dense))}
  if splits_into_bands(t, k, e):
    fns["loop_random"] = (grad(_equal_groups_loop(random_equal_experts(t, k, e), e, dt)),
                          stacked)
  med = alternate(fns, repeats)
  loops = {n: med[n] / med["dense"] for n in ("loop", "loop_random") if n in med}
  print(f"floor E={e} f={f} k={k}: experts on grouped rows / dense: forward "
        f"{med['floor_fwd'] / med['dense_fwd']:.3f}, forward+backward "
        f"{med['floor'] / med['dense']:.3f}; the block loop on equal groups / dense: " +
        ", ".join(f"{n} {v:.3f}" for n, v in loops.items()), flush=True)
  return {"T": t, "d": d, "f": f, "E": e, "k": k, "dtype": dtype, "seconds": med,
          "fwd_ratio": med["floor_fwd"] / med["dense_fwd"], "ratio": med["floor"] / med["dense"],
          **{f"{n}_ratio": v for n, v in loops.items()}}


def bench_transformers(t: int, d: int, f: int, e: int, k: int, dtype: str, repeats: int,
                       implementations: tuple[str, ...] = ("eager",)) -> dict:
  """The peer of bench_moe: transformers' Mixtral sparse block (router, top-k, experts) on
  torch, forward+backward of sum(output) on the same shapes, against a torch SwiGLU of width
  k*f; each experts implementation of transformers (`eager`: its loop over experts,
  `batched_mm`, `grouped_mm`) and the dense FFN alternate after a warm-up. Median seconds
  and, per implementation, the ratio to dense. Run it in its own process (bench_moe does):
  torch's and XLA's thread pools would share the cores."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.models.mixtral import configuration_mixtral, modeling_mixtral  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  dt = getattr(torch, dtype)
  cfg = configuration_mixtral.MixtralConfig(hidden_size=d, intermediate_size=f,
                                            num_local_experts=e, num_experts_per_tok=k)
  block = modeling_mixtral.MixtralSparseMoeBlock(cfg).to(dt)
  for p in block.parameters():
    torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
  dense = [torch.randn(s, dtype=dt).mul_(s[-1] ** -0.5).requires_grad_()
           for s in ((k * f, d), (k * f, d), (d, k * f))]
  x = torch.randn(1, t, d, dtype=dt, requires_grad=True)

  def moe(impl):
    def run():
      cfg._experts_implementation = impl
      block.zero_grad(set_to_none=True)
      x.grad = None
      block(x).float().sum().backward()
    return run

  def swiglu():
    for w in dense:
      w.grad = None
    x.grad = None
    h = torch.nn.functional.silu(x @ dense[0].T) * (x @ dense[1].T)
    (h @ dense[2].T).float().sum().backward()

  # torch on CPU runs synchronously: alternate's block_until_ready(None) waits for nothing.
  med = alternate({**{impl: (moe(impl), ()) for impl in implementations},
                   "dense": (swiglu, ())}, repeats)
  return {"T": t, "d": d, "f": f, "E": e, "k": k, "dtype": dtype, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "seconds": med,
          "ratio": {impl: med[impl] / med["dense"] for impl in implementations}}


def bench_gmm(m: int, k: int, n: int, e: int, dtype: str, repeats: int,
              tilings: tuple = (None,)) -> dict:
  """TFLOP/s of one grouped matmul [m, k] x [e, k, n] over e equal groups: the Pallas gmm
  (forward, at each tiling of `tilings`; None: its default), jax.lax.ragged_dot, and a
  dense [m, k] x [k, n] matmul of the same FLOPs. On CPU the Pallas kernel runs in the
  interpreter: that number is not a kernel timing. Returns the shape and {name: TFLOP/s}."""
  from pallas_kernels.gmm import ops as gmm_ops  # pylint: disable=g-import-not-at-top
  dt = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.key(1), 2)
  lhs = jax.random.normal(ks[0], (m, k), dt)
  rhs = jax.random.normal(ks[1], (e, k, n), dt) * k ** -0.5
  sizes = jnp.full((e,), m // e, jnp.int32).at[-1].add(m % e)
  name = lambda t: "gmm" if t is None else "gmm_" + "x".join(map(str, t))
  fns = {name(t): (jax.jit(lambda l, r, s, t=t: gmm_ops.gmm(l, r, s, None, t)), (lhs, rhs, sizes))
         for t in tilings}
  fns.update({"ragged_dot": (jax.jit(jax.lax.ragged_dot), (lhs, rhs, sizes)),
              "dense": (jax.jit(jnp.matmul), (lhs, rhs[0]))})
  tflops = {name: 2 * m * k * n / s / 1e12 for name, s in alternate(fns, repeats).items()}
  print(f"gmm m={m} k={k} n={n} groups={e} dtype={dtype} device={jax.devices()[0].device_kind}")
  print(" ".join(f"{name}_tflops={v:.3f}" for name, v in tflops.items()), flush=True)
  return {"m": m, "k": k, "n": n, "groups": e, "dtype": dtype, "tflops": tflops}


def bench_moa(b: int, length: int, d: int, h: int, g: int, n: int, shared_kv: bool,
              dtype: str, repeats: int) -> float:
  """Forward+backward of a soft Mixture of Attention with `n` experts against one dense
  attention of the same shape; returns the ratio moa / (n * dense). Both run with RoPE
  and a causal mask, alternating in one process."""
  dt, kd = jnp.dtype(dtype), d // h
  ks = jax.random.split(jax.random.key(0), 12)
  x = jax.random.normal(ks[0], (b, length, d), dt)
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  mask = layers.attention_mask(jnp.ones((b, length), jnp.int32), None)
  inv = layers.rope_inv_freq(kd, 10000.0, None)
  kv = (d, g, kd) if shared_kv else (n, d, g, kd)
  w = lambda i, s: jax.random.normal(ks[i], s, dt) * d ** -0.5
  moa_w = (w(1, (d, n)), w(2, (n, d, h, kd)), w(3, kv), w(4, kv), w(5, (n, h, kd, d)))
  dense_w = (w(6, (d, h, kd)), w(7, (d, g, kd)), w(8, (d, g, kd)), w(9, (h, kd, d)))

  def moa_loss(x, router, wq, wk, wv, wo):
    gates = moa_lib.gates(moa_lib.router_probs(x, router), 0)
    y = moa_lib.mixture_of_attention(x, gates, wq, wk, wv, wo, positions, mask, inv)
    return jnp.sum(y.astype(jnp.float32))

  def dense_loss(x, wq, wk, wv, wo):
    q = layers.apply_rope(jnp.einsum("bld,dhk->blhk", x, wq), positions, inv)
    k = layers.apply_rope(jnp.einsum("bld,dgk->blgk", x, wk), positions, inv)
    v = jnp.einsum("bld,dgk->blgk", x, wv)
    out = layers.gqa_attention(q, k, v, mask)
    return jnp.sum(jnp.einsum("blhk,hkd->bld", out, wo).astype(jnp.float32))

  fns = {"moa": (jax.jit(jax.grad(moa_loss, argnums=tuple(range(6)))), (x, *moa_w)),
         "dense": (jax.jit(jax.grad(dense_loss, argnums=tuple(range(5)))), (x, *dense_w))}
  med = alternate(fns, repeats)
  ratio = med["moa"] / (n * med["dense"])
  print(f"B={b} L={length} d={d} heads={h} kv_heads={g} experts={n} shared_kv={shared_kv} "
        f"dtype={dtype} device={jax.devices()[0].device_kind}")
  print(f"moa_fwd_bwd_s={med['moa']:.4f} dense_attention_fwd_bwd_s={med['dense']:.4f}")
  print(f"ratio={ratio:.3f}")
  return ratio


def bench_generate(new_tokens: int, check_tokens: int, prompt: str, repeats: int,
                   upcycle_experts: int) -> dict:
  """Greedy generation of `new_tokens` from the embedded SmolLM2, with the KV cache
  (moe_jax.generation.generate) against the full-forward reference (generate_uncached),
  alternating after a warm-up run of each (the warm-ups compile); EOS is ignored so both
  emit exactly `new_tokens`. Then, on the copy upcycle of every layer into
  `upcycle_experts` experts top-2, the first `check_tokens` with and without the cache."""
  model, tok = load.load_model("")
  ids = tok.encode(prompt)
  runs = {"cached": lambda m, n: generation.generate(m, [ids], n)[0],
          "uncached": lambda m, n: generation.generate_uncached(m, ids, n)}
  # Warm-ups compile: a whole cached run (cheap), and one forward of the uncached
  # buffer's shape (a whole uncached run is new_tokens forwards of that length).
  runs["cached"](model, new_tokens)
  generation._next_token_uncached(model, jnp.zeros((1, len(ids) + new_tokens), jnp.int32),
                                  jnp.int32(0))
  out, times = {}, {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      got = fn(model, new_tokens)
      times[name].append(time.perf_counter() - t0)
      assert out.setdefault(name, got) == got
  med = {name: float(np.median(v)) for name, v in times.items()}
  result = {"new_tokens": new_tokens, "prompt_tokens": len(ids), "repeats": repeats,
            "cached_s": med["cached"], "uncached_s": med["uncached"],
            "cached_tokens_per_s": new_tokens / med["cached"],
            "uncached_tokens_per_s": new_tokens / med["uncached"],
            "speedup": med["uncached"] / med["cached"],
            "dense_cached_equals_uncached": out["cached"] == out["uncached"],
            "device": jax.devices()[0].device_kind}
  print(f"SmolLM2 dense, {new_tokens} new tokens after {len(ids)}: cached "
        f"{result['cached_tokens_per_s']:.1f} tok/s, uncached "
        f"{result['uncached_tokens_per_s']:.2f} tok/s, identical={out['cached'] == out['uncached']}")
  print(f"speedup={result['speedup']:.1f}")
  if upcycle_experts:
    spec = methods.UpcycleSpec(method="copy", num_experts=upcycle_experts, top_k=2)
    moe = convert.upcycle_model(load.open_source(""), spec, router_std=0.5)
    cached, uncached = runs["cached"](moe, check_tokens), runs["uncached"](moe, check_tokens)
    result.update(check_tokens=check_tokens, upcycle=f"copy, {upcycle_experts} experts top-2, "
                  "every layer", moe_cached_equals_uncached=cached == uncached,
                  moe_equals_dense=cached == out["uncached"][:check_tokens])
    print(f"upcycled ({result['upcycle']}), {check_tokens} tokens: cached == uncached: "
          f"{cached == uncached}; == dense: {result['moe_equals_dense']}")
  return result


LAYOUTS = ("loop", "scan", "stacked")  # compile_memory's layer layouts


def compile_memory(cfg, batch: int, length: int, variants: list[tuple[str, str]]
                   ) -> dict[tuple[str, str], dict[str, float]]:
  """For each (layout, remat): seconds to lower and compile the gradient of the training
  loss of `cfg` on a [batch, length] batch, and the compiled program's memory_analysis()
  bytes. Layouts: loop (a Python loop over the layers), scan (layers stored per layer,
  stacked inside the step for the scan), stacked (stored stacked, as training stores them
  with scan_layers: models/layer_stack.py). Params are abstract (nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  batch_ = {"tokens": tokens, "targets": tokens, "positions": tokens, "segment_ids": tokens,
            "loss_mask": jax.ShapeDtypeStruct((batch, length), jnp.float32)}
  out = {}
  for layout, remat in variants:
    model = llama.abstract(cfg.replace(scan_layers=layout != "loop", remat=remat))
    if layout == "stacked":
      model = nnx.eval_shape(layer_stack.stack_layers, model)
    graphdef, state = nnx.split(model)

    def grad(state, batch, graphdef=graphdef):
      return nnx.value_and_grad(lambda m: step.loss_fn(m, batch, key=None)[0])(
          nnx.merge(graphdef, state))

    t0 = time.perf_counter()
    compiled = jax.jit(grad).lower(state, batch_).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out[(layout, remat)] = {"compile_s": seconds, "temp_bytes": mem.temp_size_in_bytes,
                            "argument_bytes": mem.argument_size_in_bytes,
                            "output_bytes": mem.output_size_in_bytes}
    print(f"layers={layout} remat={remat}: compile {seconds:.1f} s, temp "
          f"{mem.temp_size_in_bytes / 2**30:.2f} GiB, arguments "
          f"{mem.argument_size_in_bytes / 2**30:.2f} GiB", flush=True)
  return out


# Model shapes for benchmarks that need no checkpoint: the weights are random, the shapes
# are real. smollm2-135m is the embedded model's config (a test checks it against the
# GGUF), llama-1b the synthetic 1.1B model of experiments.bench_upcycle (TinyLlama's
# shape), seed the study's seed model (configs/study/common.py).
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, ffn_dim=1536, rope_theta=100000.0, rms_eps=1e-5,
                         tie_embeddings=True, max_seq_len=8192),
    "llama-1b": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                     head_dim=64, ffn_dim=5632, rms_eps=1e-5, max_seq_len=2048),
    "seed": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                 head_dim=32, ffn_dim=512, max_seq_len=512),
}


def model_shape(name: str, experts: int = 0, top_k: int = 2, **moe) -> ModelConfig:
  """SHAPES[name] as a ModelConfig; with experts > 0, copy-upcycled into that many experts
  top_k in every layer (moe: MoeConfig overrides, e.g. backend)."""
  if name not in SHAPES:
    raise ValueError(f"model={name!r}: expected one of {sorted(SHAPES)}")
  cfg = ModelConfig(**SHAPES[name])
  if experts:
    cfg = convert.moe_model_config(cfg, methods.UpcycleSpec("copy", experts, top_k), **moe)
  return cfg


def _train_runner(cfg, batch: int, length: int, steps: int):
  """(run_round, figures): builds `cfg` (random weights) and the train step of
  experiments.train (AdamW, the layers stored stacked when cfg.scan_layers), compiles it
  and takes one step. run_round() dispatches `steps` steps back to back on random tokens,
  blocks at the end and returns the seconds per step; figures() the model's sizes, init and
  compile times and last loss."""
  t0 = time.perf_counter()
  model = llama.create(cfg)
  if cfg.scan_layers:
    model = layer_stack.stack_layers(model)
  optimizer = step.make_optimizer(model, optim.OptimConfig(total_steps=steps))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  init_s = time.perf_counter() - t0
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length + 1),
                                              dtype=np.int32)
  data = {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
          "segment_ids": jnp.ones((batch, length), jnp.int32),
          "loss_mask": jnp.ones((batch, length), jnp.float32)}
  key, lr = jax.random.key(0), jnp.float32(1e-4)
  t0 = time.perf_counter()
  last = [step.train_step(model, optimizer, data, key, lr)]
  jax.block_until_ready(last[0]["loss"])
  first_s = time.perf_counter() - t0  # compile + one step

  def run_round() -> float:
    t0 = time.perf_counter()
    for i in range(steps):
      last[0] = step.train_step(model, optimizer, data, jax.random.fold_in(key, i), lr)
    jax.block_until_ready(last[0]["loss"])
    return (time.perf_counter() - t0) / steps

  figures = lambda: {"params": int(params), "active_params": flops.active_params_per_token(cfg),
                     "batch": batch, "length": length, "init_s": init_s,
                     "first_step_s": first_s, "loss": float(last[0]["loss"])}
  return run_round, figures


def _train_result(cfg, figures: dict, step_s: float) -> dict:
  """The train figures of one model at `step_s` seconds a step (tokens/s, model TFLOP/s,
  MFU: model FLOPs, 6 x active params + attention with no recompute, over the device's
  dense bf16 peak, None where unknown, e.g. CPU), printed as two lines."""
  batch, length = figures["batch"], figures["length"]
  tps = batch * length / step_s
  fpt = flops.train_flops_per_token(cfg, length)
  peak = flops.peak_flops_per_device()
  out = {**figures, "step_s": step_s, "tokens_per_s": tps, "model_tflops_per_s": tps * fpt / 1e12,
         "mfu": tps * fpt / peak if peak else None, "device": jax.devices()[0].device_kind}
  moe = f"{cfg.moe.num_experts} experts top-{cfg.moe.top_k} backend={cfg.moe.backend}" \
      if cfg.moe else "dense"
  print(f"{moe} params={out['params'] / 1e6:.1f}M active={out['active_params'] / 1e6:.1f}M "
        f"batch={batch}x{length} dtype={cfg.dtype} remat={cfg.remat} "
        f"scan_layers={cfg.scan_layers} device={out['device']}")
  mfu = f"{out['mfu']:.3f}" if peak else "n/a"
  print(f"init {out['init_s']:.1f} s, compile+first step {out['first_step_s']:.1f} s, step "
        f"{step_s * 1e3:.1f} ms, {tps:.0f} tokens/s, {out['model_tflops_per_s']:.1f} model "
        f"TFLOP/s, mfu={mfu}", flush=True)
  return out


def bench_train(cfg, batch: int, length: int, steps: int, rounds: int = 2) -> dict:
  """Training throughput of `cfg` (_train_runner): the best of `rounds` rounds of `steps`
  steps."""
  return bench_train_alternating([cfg], batch, length, steps, rounds)[0]


def bench_train_alternating(cfgs: list, batch: int, length: int, steps: int,
                            rounds: int = 2) -> list[dict]:
  """bench_train of every config in `cfgs`, built and compiled first, then timed round by
  round in turn (model 1, model 2, ..., model 1, ...), each model's best round: ratios
  between them side by side in time, where one model after another would also measure the
  machine's drift. Holds every model and optimizer state in memory at once."""
  runners = [_train_runner(cfg, batch, length, steps) for cfg in cfgs]
  times = [[] for _ in cfgs]
  for _ in range(rounds):
    for t, (run_round, _) in zip(times, runners):
      t.append(run_round())
  return [_train_result(cfg, figures(), min(t))
          for cfg, (_, figures), t in zip(cfgs, runners, times)]
