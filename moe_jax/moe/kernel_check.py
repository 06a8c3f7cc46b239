"""Run every Pallas kernel (pallas_kernels/) on this machine's platform against plain-jnp
references, forward and backward: the check behind `experiments/check_kernels.py --run`.

The ops are called with `target=None`, so a GPU runs the Triton kernels, a TPU the Mosaic
ones and a CPU the interpreter. Every call draws fresh random inputs: group sizes are
uneven, with one empty group, and not multiples of any tile. The references use
`jax.lax.ragged_dot`, jnp indexing, `moe_jax.moe.routers` and the `dropless` backend, on
the same inputs upcast to float32 at the highest matmul precision. The error is
||got - want|| / ||want|| over all elements; a NaN or Inf anywhere fails.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe import layer, routers
from moe_jax.moe.config import MoeConfig
from pallas_kernels.gmm import ops as gmm_ops
from pallas_kernels.permute import ops as permute_ops
from pallas_kernels.router import ops as router_ops

# Relative-error bounds by input dtype: a GPU's float32 dots may run in TF32 (~3e-4),
# bfloat16 operands land between 1e-3 and 1e-2.
TOLERANCE = {"float32": 2e-3, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Sizes:
  t: int = 96   # tokens
  d: int = 32   # model width
  f: int = 24   # expert width
  e: int = 4    # experts
  k: int = 2    # experts per token


def rel_err(got, want) -> float:
  """||got - want|| / ||want|| in float64; inf when `got` holds a NaN or an Inf."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.isfinite(got).all():
    return float("inf")
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _f32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _uneven_sizes(rng: np.random.Generator, m: int, e: int) -> jax.Array:
  """E group sizes summing to m: group 0 empty, the rest uneven."""
  share = rng.dirichlet(np.full(e - 1, 0.7))
  return jnp.asarray(np.concatenate([[0], rng.multinomial(m, share)]), jnp.int32)


def check_gmm(key, s: Sizes, dtype) -> dict[str, float]:
  m = s.t * s.k
  ks = jax.random.split(key, 3)
  lhs = jax.random.normal(ks[0], (m, s.d), dtype)
  rhs = (jax.random.normal(ks[1], (s.e, s.d, s.f)) * s.d ** -0.5).astype(dtype)
  mix = jax.random.normal(ks[2], (m, s.f))
  sizes = _uneven_sizes(np.random.default_rng(int(jax.random.randint(ks[2], (), 0, 2**30))),
                        m, s.e)
  ref_dot = lambda l, r, g: jax.lax.ragged_dot(l, r, g, precision=jax.lax.Precision.HIGHEST)

  def loss(fn, l, r):
    return jnp.sum(jnp.sin(fn(l, r, sizes).astype(jnp.float32)) * mix)

  out = jax.jit(gmm_ops.gmm)(lhs, rhs, sizes)
  want = jax.jit(ref_dot)(*_f32((lhs, rhs)), sizes)
  got_g = jax.jit(jax.grad(lambda l, r: loss(gmm_ops.gmm, l, r), argnums=(0, 1)))(lhs, rhs)
  want_g = jax.jit(jax.grad(lambda l, r: loss(ref_dot, l, r), argnums=(0, 1)))(*_f32((lhs, rhs)))
  return {"gmm": rel_err(out, want), "gmm d/d lhs": rel_err(got_g[0], want_g[0]),
          "gmm d/d rhs (tgmm)": rel_err(got_g[1], want_g[1])}


def check_permute(key, s: Sizes, dtype) -> dict[str, float]:
  kx, ke, kw, ky = jax.random.split(key, 4)
  x = jax.random.normal(kx, (s.t, s.d), dtype)
  experts = jnp.argsort(jax.random.uniform(ke, (s.t, s.e)), axis=1)[:, :s.k].astype(jnp.int32)
  weights = jax.nn.softmax(jax.random.normal(kw, (s.t, s.k)), axis=-1).astype(dtype)
  p = permute_ops.plan(experts, s.e)
  ys = jax.random.normal(ky, (s.t * s.k, s.d), dtype)
  src = p.order_M // s.k  # assignment a = t * k + slot comes from token t
  ref_unpermute = lambda ys, w: jnp.einsum("tk,tkd->td", w, ys[p.row_TxK])
  sq = lambda a: jnp.sum(jnp.sin(a.astype(jnp.float32)))
  out = {"permute": rel_err(jax.jit(permute_ops.permute)(x, p), x[src]),
         "unpermute": rel_err(jax.jit(permute_ops.unpermute)(ys, weights, p),
                              ref_unpermute(*_f32((ys, weights))))}
  gx = jax.jit(jax.grad(lambda x: sq(permute_ops.permute(x, p))))(x)
  out["permute d/d x"] = rel_err(gx, jax.grad(lambda x: sq(x[src]))(_f32(x)))
  g = jax.jit(jax.grad(lambda y, w: sq(permute_ops.unpermute(y, w, p)), argnums=(0, 1)))(ys, weights)
  want = jax.grad(lambda y, w: sq(ref_unpermute(y, w)), argnums=(0, 1))(*_f32((ys, weights)))
  out["unpermute d/d rows, weights"] = max(rel_err(g[0], want[0]), rel_err(g[1], want[1]))
  return out


def check_router(key, s: Sizes) -> dict[str, float]:
  """Both routing orders: the same experts and counts, and equal weights, probabilities
  and logit gradients (float32 logits, as the layer routes)."""
  kl, kd = jax.random.split(key)
  logits = jax.random.normal(kl, (s.t, s.e)) * 2
  dw = jax.random.normal(kd, (s.t, s.k))
  out = {}
  for name, norm in (("topk_softmax", False), ("softmax_topk", True)):
    cfg = MoeConfig(num_experts=s.e, top_k=s.k, expert_dim=s.f, router=name,
                    norm_topk_prob=norm)
    fused = jax.jit(lambda l, cfg=cfg: router_ops.route(l, cfg))(logits)
    ref = routers.route(logits, cfg)
    same = (np.asarray(fused.experts_TxK) == np.asarray(ref.experts_TxK)).all()
    counts = np.bincount(np.asarray(ref.experts_TxK).ravel(), minlength=s.e)
    same &= (np.asarray(fused.counts_E) == counts).all()
    loss = lambda r: jnp.sum(r.weights_TxK * dw) + jnp.sum(jnp.sin(r.probs_TxE))
    g = jax.jit(jax.grad(lambda l, cfg=cfg: loss(router_ops.route(l, cfg))))(logits)
    g_ref = jax.grad(lambda l, cfg=cfg: loss(routers.route(l, cfg)))(logits)
    out[f"router {name}"] = (max(rel_err(fused.weights_TxK, ref.weights_TxK),
                                 rel_err(fused.probs_TxE, ref.probs_TxE), rel_err(g, g_ref))
                             if same else float("inf"))
  return out


def check_layer(key, s: Sizes, dtype) -> dict[str, float]:
  """The routed layer, backend pallas against dropless: output and every input's gradient."""
  kp = jax.random.split(key, 5)
  params = (jax.random.normal(kp[0], (s.d, s.e)) * 0.3,
            *((jax.random.normal(kp[i], sh) * sh[-2] ** -0.5).astype(dtype)
              for i, sh in ((1, (s.e, s.d, s.f)), (2, (s.e, s.d, s.f)), (3, (s.e, s.f, s.d)))))
  x = jax.random.normal(kp[4], (s.t, s.d), dtype)

  def value_and_grad(backend, dt):
    cfg = MoeConfig(num_experts=s.e, top_k=s.k, expert_dim=s.f, backend=backend)
    fn = lambda x, *p: jnp.sum(jnp.sin(layer.moe_forward(x, *p, cfg, dtype=dt)[0]
                                       .astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4)))

  loss, grads = value_and_grad("pallas", dtype)(x, *params)
  with jax.default_matmul_precision("highest"):
    ref_loss, ref_grads = value_and_grad("dropless", jnp.float32)(*_f32((x, *params)))
  return {"layer loss": rel_err(loss, ref_loss),
          "layer grads": max(rel_err(g, r) for g, r in zip(grads, ref_grads))}


def run_all(sizes: Sizes, dtype: str, seed: int = 0,
            errors: dict[str, str] | None = None) -> dict[str, float]:
  """Every check at `sizes` in `dtype` (the router always routes float32 logits). With
  `errors`, a group of checks that raises (a kernel that does not compile, say) is recorded
  there as one line under the group's name and the other groups still run."""
  dt = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.key(seed), 4)
  groups = {"gmm": lambda: check_gmm(ks[0], sizes, dt),
            "permute": lambda: check_permute(ks[1], sizes, dt),
            "router": lambda: check_router(ks[2], sizes),
            "layer": lambda: check_layer(ks[3], sizes, dt)}
  out = {}
  for name, check in groups.items():
    if errors is None:
      out.update(check())
      continue
    try:
      out.update(check())
    except Exception as e:  # pylint: disable=broad-except
      errors[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"
  return out
