"""MoE layer: routing invariants (hypothesis), backend equivalence, gradients, config errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from moe_jax.moe import dispatch, layer, losses, routers
from moe_jax.moe.config import MoeConfig
from moe_jax.moe.routers import Routing

SETTINGS = settings(max_examples=12, deadline=None)


def _weights(e, d, f, seed=0, scale=0.3):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (d, e)) * scale,
          jax.random.normal(ks[1], (e, d, f)) * scale, jax.random.normal(ks[2], (e, d, f)) * scale,
          jax.random.normal(ks[3], (e, f, d)) * scale)


def _reference(x, routing, wg, wu, wd, keep_TxK=None):
  """Plain per-token loop over the chosen experts (numpy)."""
  x, wg, wu, wd = map(np.asarray, (x, wg, wu, wd))
  w, idx = np.asarray(routing.weights_TxK), np.asarray(routing.experts_TxK)
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(idx.shape[1]):
      if keep_TxK is not None and not keep_TxK[t, j]:
        continue
      e = idx[t, j]
      g = x[t] @ wg[e]
      h = g / (1 + np.exp(-g)) * (x[t] @ wu[e])
      out[t] += w[t, j] * (h @ wd[e])
  return out


route_cases = st.tuples(st.integers(1, 40), st.integers(1, 8), st.integers(1, 8),
                        st.sampled_from(sorted(routers.ROUTERS)), st.integers(0, 10_000))


@SETTINGS
@given(route_cases)
def test_router_invariants(case):
  t, e, k, name, seed = case
  k = min(k, e)
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=4, router=name)
  logits = jax.random.normal(jax.random.key(seed), (t, e)) * 3
  bias_E = jnp.linspace(-1, 1, e) if name == "sigmoid_bias" else None
  r = jax.jit(lambda l, b: routers.route(l, cfg, bias_E=b))(logits, bias_E)
  w, idx = np.asarray(r.weights_TxK), np.asarray(r.experts_TxK)
  assert (w >= 0).all()
  assert all(len(set(row)) == len(row) for row in idx.tolist())
  np.testing.assert_allclose(np.asarray(r.probs_TxE).sum(-1), 1.0, atol=1e-5)
  if name == "topk_softmax":
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    top = np.sort(np.asarray(logits), -1)[:, ::-1][:, :k]
    np.testing.assert_allclose(np.sort(np.take_along_axis(np.asarray(logits), idx, -1), -1)[:, ::-1], top, atol=1e-6)


@settings(max_examples=5, deadline=None)
@given(st.integers(2, 48), st.integers(2, 6), st.integers(1, 3),
       st.sampled_from([0.25, 0.5, 1.0, 1.5]), st.sampled_from(["probability", "position"]),
       st.integers(0, 1000))
def test_capacity_never_exceeded_and_drops_contribute_nothing(t, e, k, cf, policy, seed):
  k = min(k, e)
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=4, backend="capacity", capacity_factor=cf,
                  drop_policy=policy)
  router, wg, wu, wd = _weights(e, 6, 4, seed)
  x = jax.random.normal(jax.random.key(seed + 1), (t, 6))
  r = jax.jit(routers.route, static_argnums=1)(x @ router, cfg)
  c = dispatch.capacity(t, cfg)
  layout, _, c2 = jax.jit(dispatch.capacity_layout, static_argnums=1)(r, cfg)
  dest, keep = np.asarray(layout.dest_N), np.asarray(layout.dest_N) < e * c
  assert c2 == c and len(set(dest[keep].tolist())) == keep.sum()  # one slot per assignment
  kept_per_expert = np.bincount(dest[keep] // c, minlength=e)
  assert kept_per_expert.max() <= c
  assert (dest[keep] // c == np.asarray(r.experts_TxK).reshape(-1)[np.asarray(layout.order_N)][keep]).all()
  keep_TxK = np.zeros(t * k, bool)
  keep_TxK[np.asarray(layout.order_N)] = keep
  keep_TxK = keep_TxK.reshape(t, k)
  if policy == "probability":  # a dropped assignment never outweighs a kept one of its expert
    w, idx = np.asarray(r.weights_TxK), np.asarray(r.experts_TxK)
    for ex in range(e):
      kept, dropped = w[(idx == ex) & keep_TxK], w[(idx == ex) & ~keep_TxK]
      if len(kept) and len(dropped):
        assert dropped.max() <= kept.min() + 1e-7
  for backend in dispatch.CAPACITY_BACKENDS:
    y, frac = jax.jit(dispatch.BACKENDS[backend], static_argnums=5)(
        x, r, wg, wu, wd, MoeConfig(**{**cfg.__dict__, "backend": backend}))
    np.testing.assert_allclose(np.asarray(y), _reference(x, r, wg, wu, wd, keep_TxK), atol=1e-4)
    assert abs(float(frac) - (1 - keep_TxK.mean())) < 1e-6


@pytest.mark.parametrize("cf", [0.5, 2.0])  # with drops, and without
def test_gather_and_combine_equal_the_scatter_formulas_with_their_gradients(cf):
  """dispatch.gather / combine move rows by gathers in both directions (custom VJPs);
  against the plain scatter formulas: outputs, and the gradients of x, y and the weights."""
  t, e, k, d = 24, 4, 2, 6
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=4, backend="capacity", capacity_factor=cf)
  x = jax.random.normal(jax.random.key(0), (t, d))
  r = routers.route(x @ jax.random.normal(jax.random.key(1), (d, e)), cfg)
  layout, _, _ = dispatch.capacity_layout(r, cfg)
  y = jax.random.normal(jax.random.key(2), (layout.rows, d))

  def gather_ref(x):
    buf = jnp.zeros((layout.rows + 1, d)).at[layout.dest_N].set(x[layout.token_N])
    return buf[:-1]

  def combine_ref(y, w):
    rows = jnp.concatenate([y, jnp.zeros((1, d))])[layout.dest_N] * w[:, None]
    return jnp.zeros((t, d)).at[layout.token_N].add(rows)

  combine = lambda y, w: dispatch.combine(y, layout._replace(weight_N=w), t)
  np.testing.assert_allclose(dispatch.gather(x, layout), gather_ref(x), atol=1e-6)
  np.testing.assert_allclose(combine(y, layout.weight_N), combine_ref(y, layout.weight_N),
                             atol=1e-6)
  g = jax.random.normal(jax.random.key(3), (layout.rows, d))
  np.testing.assert_allclose(jax.vjp(lambda x: dispatch.gather(x, layout), x)[1](g)[0],
                             jax.vjp(gather_ref, x)[1](g)[0], atol=1e-6)
  dy = jax.random.normal(jax.random.key(4), (t, d))
  got = jax.vjp(combine, y, layout.weight_N)[1](dy)
  want = jax.vjp(combine_ref, y, layout.weight_N)[1](dy)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-6)
  unweighted = dispatch.combine(y, layout, t, weighted=False)
  np.testing.assert_allclose(unweighted, combine_ref(y, (layout.dest_N < layout.rows) * 1.0),
                             atol=1e-6)


def test_aux_loss_is_one_at_perfect_balance():
  e, k = 4, 2
  experts = jnp.array([[0, 1], [2, 3], [1, 0], [3, 2]])
  probs = jnp.full((4, e), 1 / e)
  assert abs(float(losses.aux_loss(probs, experts, e)) - 1.0) < 1e-6
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=4, aux_loss_coeff=0.03)
  x = jnp.ones((4, 6))
  router = jnp.zeros((6, e))  # uniform probabilities; top-k ties broken by index -> unbalanced
  _, stats = layer.moe_forward(x, router, *_weights(e, 6, 4)[1:], cfg)
  f = np.asarray(stats["load_E"])
  np.testing.assert_allclose(float(stats["aux_loss"]), 0.03 * e * np.sum(f / e), rtol=1e-6)


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk", "sigmoid_bias"])
def test_backends_agree_when_nothing_drops(router):
  e, k, t, d, f = 4, 2, 24, 8, 6
  params = _weights(e, d, f, seed=3)
  x = jax.random.normal(jax.random.key(7), (t, d))
  outs = {}
  for backend in ("dropless", "ragged", *dispatch.CAPACITY_BACKENDS):
    cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=f, backend=backend, router=router,
                    capacity_factor=float(e))
    loss = lambda x, *p: jnp.sum(jnp.sin(layer.moe_forward(x, *p, cfg)[0]))
    outs[backend] = (jax.jit(lambda *a: layer.moe_forward(*a, cfg)[0])(x, *params),
                     jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, *params))
  ref_y, ref_g = outs["ragged"]
  r = routers.route(x @ params[0], MoeConfig(num_experts=e, top_k=k, expert_dim=f, router=router))
  np.testing.assert_allclose(np.asarray(ref_y), _reference(x, r, *params[1:]), atol=1e-5)
  for name, (y, g) in outs.items():
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=1e-5, err_msg=name)
    for a, b in zip(g, ref_g):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("cf,policy", [(0.5, "probability"), (1.0, "position"),
                                       (1.25, "probability")])
def test_capacity_on_the_block_loop_equals_the_batched_buffer_with_drops(cf, policy):
  """capacity_grouped (the CPU `capacity`) against capacity_gather ([E, C, D] and batched
  matmuls), with assignments dropped: outputs, dropped fraction and every gradient,
  through the router too. Skewed routing so that some experts overflow, others idle."""
  e, k, t, d, f = 8, 2, 96, 8, 6
  router, wg, wu, wd = _weights(e, d, f, seed=13)
  router = router.at[:, :2].mul(4.0)  # experts 0 and 1 attract most tokens
  x = jax.random.normal(jax.random.key(4), (t, d))
  outs = {}
  for backend in ("capacity_gather", "capacity_grouped"):
    cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=f, backend=backend, capacity_factor=cf,
                    drop_policy=policy)
    def loss(x, *p, cfg=cfg):
      y, stats = layer.moe_forward(x, *p, cfg)
      return jnp.sum(jnp.sin(y)) + stats["aux_loss"], stats["dropped_fraction"]
    outs[backend] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        x, router, wg, wu, wd)
  (ref, ref_frac), ref_g = outs["capacity_gather"]
  (got, frac), g = outs["capacity_grouped"]
  assert float(ref_frac) > 0.05 and float(frac) == float(ref_frac)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
  for a, b in zip(g, ref_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_dropless_gradient_matches_finite_differences():
  e, k, t, d, f = 3, 2, 10, 4, 5
  router, wg, wu, wd = _weights(e, d, f, seed=5)
  x = jax.random.normal(jax.random.key(9), (t, d))
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=f, backend="dropless")
  loss = jax.jit(lambda wg, wu, wd: jnp.sum(layer.moe_forward(x, router, wg, wu, wd, cfg)[0] ** 2))
  grads = jax.grad(loss, argnums=(0, 1, 2))(wg, wu, wd)
  rng = np.random.default_rng(0)
  eps = 1e-2
  for i, (w, g) in enumerate(zip((wg, wu, wd), grads)):
    for _ in range(4):
      idx = tuple(rng.integers(0, s) for s in w.shape)
      args = [wg, wu, wd]
      hi = args.copy(); hi[i] = w.at[idx].add(eps)
      lo = args.copy(); lo[i] = w.at[idx].add(-eps)
      fd = (float(loss(*hi)) - float(loss(*lo))) / (2 * eps)
      assert abs(fd - float(g[idx])) < 2e-3 * max(1.0, abs(fd)), (i, idx, fd, float(g[idx]))


@pytest.mark.parametrize("backend", ["dropless", "capacity"])
def test_gradient_reaches_only_routed_experts(backend):
  e, k, t, d, f = 6, 2, 8, 8, 4
  router, wg, wu, wd = _weights(e, d, f, seed=11)
  x = jax.random.normal(jax.random.key(2), (t, d))
  cfg = MoeConfig(num_experts=e, top_k=k, expert_dim=f, backend=backend, capacity_factor=float(e))
  idx = np.asarray(routers.route(x @ router, cfg).experts_TxK)
  loss = lambda wg, wu, wd, tok: jnp.sum(layer.moe_forward(x, router, wg, wu, wd, cfg)[0][tok])
  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  for tok in range(t):
    grads = grad_fn(wg, wu, wd, tok)
    touched = {ex for ex in range(e)
               if any(float(jnp.abs(g[ex]).max()) > 0 for g in grads)}
    assert touched == set(idx[tok].tolist())


def test_no_retrace_across_steps():
  cfg = MoeConfig(num_experts=4, top_k=2, expert_dim=8, jitter=0.1)
  with nnx.use_eager_sharding(False):
    block = layer.MoeBlock(cfg, 8, rngs=nnx.Rngs(0))

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def step(block, x, key):
    return nnx.grad(lambda b: b(x, train=True, key=key)[0].sum())(block)

  for i in range(3):
    step(block, jax.random.normal(jax.random.key(i), (2, 16, 8)), jax.random.key(i))


def test_shared_expert_and_router_bias():
  cfg = MoeConfig(num_experts=4, top_k=1, expert_dim=8, shared_expert_dim=6,
                  shared_expert_gate=True, router="sigmoid_bias")
  with nnx.use_eager_sharding(False):
    block = layer.MoeBlock(cfg, 8, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (1, 5, 8))
  y, stats = block(x)
  routed, _ = layer.moe_forward(x[0], block.router[...], block.w_gate[...], block.w_up[...],
                                block.w_down[...], cfg, bias_E=block.router_bias[...])
  xs = x[0]
  shared = (jax.nn.silu(xs @ block.shared_w_gate[...]) * (xs @ block.shared_w_up[...])) @ block.shared_w_down[...]
  expected = routed + jax.nn.sigmoid(xs @ block.shared_gate[...]) * shared
  np.testing.assert_allclose(np.asarray(y[0]), np.asarray(expected), atol=1e-6)
  bias = layer.update_router_bias(jnp.zeros(4), jnp.array([0.5, 0.25, 0.25, 0.0]), 0.1)
  np.testing.assert_allclose(np.asarray(bias), [-0.1, 0.0, 0.0, 0.1])


@pytest.mark.parametrize("kwargs,key", [
    (dict(top_k=5), "moe.top_k=5"),
    (dict(capacity_factor=0.0), "moe.capacity_factor"),
    (dict(router="hash"), "moe.router='hash'"),
    (dict(backend="megablox"), "moe.backend='megablox'"),
    (dict(shared_expert_dim=-4), "moe.shared_expert_dim"),
    (dict(layers="every:0"), "moe.layers"),
])
def test_bad_config_names_the_key(kwargs, key):
  with pytest.raises(ValueError, match=key.replace("(", r"\(")) as e:
    MoeConfig(**{"num_experts": 4, "top_k": 2, "expert_dim": 8, **kwargs})
  assert "\n" not in str(e.value)


def test_layer_placement():
  cfg = lambda s: MoeConfig(num_experts=2, top_k=1, expert_dim=4, layers=s)
  assert cfg("all").moe_layer_ids(4) == (0, 1, 2, 3)
  assert cfg("every:2").moe_layer_ids(6) == (1, 3, 5)
  assert cfg("0,3").moe_layer_ids(4) == (0, 3)
  with pytest.raises(ValueError, match="moe.layers"):
    cfg("0,7").moe_layer_ids(4)


@pytest.mark.parametrize("t,e,k,skew", [(2048, 64, 8, 0.0), (512, 8, 2, 4.0), (100, 16, 1, 8.0)])
def test_block_layout_pads_each_group_to_the_smallest_block(t, e, k, skew):
  """Every assignment gets its own row inside a block of its expert, and each expert's
  computed rows exceed its assignments by less than the smallest block (numpy check)."""
  logits = jax.random.normal(jax.random.key(t), (t, e)) + skew * jnp.arange(e) / e
  routing = routers.route(logits, MoeConfig(num_experts=e, top_k=k, expert_dim=4))
  slots = dispatch.sort_slots(routing, e)
  levels = dispatch.block_levels(t * k, e)
  blocks, rows = dispatch.block_layout(slots, e, levels)
  dest, expert = np.asarray(blocks.dest_N), np.asarray(slots.expert_N)
  assert len(set(dest.tolist())) == dest.size and dest.max() < rows
  assert rows == t * k + e * (levels[-1] - 1)  # the most any routing pads to
  computed = np.zeros(e, int)
  row_expert = np.full(rows, -1)
  for size, be, n, offset in zip(levels, *blocks.loop):
    for b in range(int(n)):
      start = int(offset) + b * size
      assert start + size <= rows and np.all(row_expert[start:start + size] == -1)
      row_expert[start:start + size] = int(be[b])
      computed[int(be[b])] += size
  np.testing.assert_array_equal(row_expert[dest], expert)
  sizes = np.bincount(expert, minlength=e)
  assert np.all(computed >= sizes) and np.all(computed - sizes < levels[-1])


def test_block_layout_cuts_each_group_into_the_fewest_blocks():
  """A group's rows, padded to whole smallest blocks, are cut greedily from the largest
  level: 1000 rows are one block of 1024, not 512 + 256 + 128 + 128."""
  sizes = [1000, 1025, 384, 0, 128, 2100]
  experts = np.random.default_rng(0).permutation(np.repeat(np.arange(len(sizes)), sizes))
  routing = Routing(jnp.ones((experts.size, 1)), jnp.asarray(experts, jnp.int32)[:, None], None)
  levels = (1024, 512, 256, 128)
  blocks, _ = dispatch.block_layout(dispatch.sort_slots(routing, len(sizes)), len(sizes), levels)
  got = [[] for _ in sizes]
  for size, be, n, _ in zip(levels, *blocks.loop):
    for b in range(int(n)):
      got[int(be[b])].append(size)
  assert got == [[1024], [1024, 128], [256, 128], [], [128], [1024, 1024, 128]]
  with pytest.raises(ValueError, match="multiples of the last"):
    dispatch.block_layout(dispatch.sort_slots(routing, len(sizes)), len(sizes), (1024, 384))


@pytest.mark.parametrize("num_experts", [5, 1 << 16])  # the packed int32 key, and argsort
def test_sort_slots_is_a_stable_sort_by_expert(num_experts):
  experts = np.random.default_rng(1).integers(0, 5, (6000, 4))
  routing = Routing(jnp.ones(experts.shape), jnp.asarray(experts, jnp.int32), None)
  slots = dispatch.sort_slots(routing, num_experts)
  order = np.argsort(experts.reshape(-1), kind="stable")
  np.testing.assert_array_equal(slots.order_N, order)
  np.testing.assert_array_equal(slots.expert_N, experts.reshape(-1)[order])
  sizes = np.bincount(experts.reshape(-1), minlength=num_experts)
  np.testing.assert_array_equal(slots.sizes_E, sizes)
  np.testing.assert_array_equal(slots.rank_N, np.arange(order.size) - (np.cumsum(sizes) - sizes)[
      experts.reshape(-1)[order]])
