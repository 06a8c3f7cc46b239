"""The benchmark library's model shapes and training-throughput step (the figures come
from experiments.bench_train on the machines docs/benchmarks.md names)."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subproc
from configs.study import common
from experiments import render_results
from moe_jax import bench
from moe_jax.convert import load
from moe_jax.moe import kernel_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smollm2_shape_is_the_embedded_models_config():
  want = load.open_source("").cfg
  got = bench.model_shape("smollm2-135m")
  for f in dataclasses.fields(want):
    a, b = getattr(got, f.name), getattr(want, f.name)
    assert (math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b), f.name


def test_seed_shape_is_the_studys_seed():
  scratch = common.base(runlocal=False, steps=1).scratch
  shape = bench.SHAPES["seed"]
  assert shape["vocab_size"] == int(scratch.tokenizer.removeprefix("bpe:"))
  assert {k: shape[k] for k in shape if k != "vocab_size"} == {k: scratch[k] for k in shape
                                                               if k != "vocab_size"}


def test_model_shape_upcycles_and_names_bad_input():
  cfg = bench.model_shape("seed", experts=4, top_k=2, backend="capacity")
  assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.backend) == (4, 2, "capacity")
  assert cfg.moe.expert_dim == cfg.ffn_dim and len(cfg.moe_layer_ids) == cfg.n_layers
  with pytest.raises(ValueError, match="model='nope': expected one of"):
    bench.model_shape("nope")


def test_bench_train_steps_an_upcycled_model():
  cfg = bench.model_shape("seed", experts=4).replace(
      vocab_size=256, n_layers=2, dtype="bfloat16", scan_layers=True)
  r = bench.bench_train(cfg, batch=2, length=16, steps=1, rounds=1)
  assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and r["mfu"] is None
  assert r["params"] > r["active_params"] > 0


@pytest.mark.parametrize("binary,flags,name", [
    ("bench_moe", ["--T=64", "--d=16", "--shapes=4:8:2", "--backend=dropless", "--gmm",
                   "--floor", "--repeats=1", "--transformers=eager"], "layer_cpu"),
    ("bench_train", ["--model=seed", "--experts=0,2", "--B=1", "--L=16", "--steps=1"],
     "train_cpu"),
    ("bench_train", ["--model=seed", "--experts=0,2", "--B=1", "--L=16", "--steps=1",
                     "--alternate", "--rounds=1"], "train_cpu"),
    ("check_kernels", ["--run", "--seeds=1", "--T=24", "--d=8", "--f=8", "--E=3"],
     "kernels_cpu")])
def test_benchmark_out_files_render_into_tables(tmp_path, binary, flags, name):
  """What accelerator_checks.sh leaves for docs/benchmarks.md: each binary's --out JSON
  names its command and device and renders (experiments.render_results) into a table."""
  out = tmp_path / f"{name}.json"
  proc = subprocess.run([sys.executable, "-m", f"experiments.{binary}", *flags, f"--out={out}"],
                        cwd=ROOT, env=subproc.env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(out.read_text())
  assert r["command"].startswith(f"python -m experiments.{binary} ") and r["device"] == "cpu"
  table = render_results.renderer(name)(r).splitlines()
  assert table[0].startswith(f"`{r['command']}`")
  rows = [line for line in table if line.startswith("| ") and not line.startswith("| E |")]
  assert len(rows) >= 3 and "FAIL" not in "\n".join(table)


_HLO = """
ENTRY %main (x: f32[8,4], w: f32[4,4]) -> f32[8,4] {
  %ynn_fusion.3 = f32[8,4]{1,0} fusion(%x, %w), kind=kCustom, calls=%fc, metadata={op_name="jit(f)/dot_general"}
  %dot_general.2 = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %wrapped_scatter = f32[8,4]{1,0} fusion(%a, %b, %c), kind=kLoop, calls=%sc, metadata={op_name="jit(f)/while/body/scatter-add" stack_frame_id=5}
  %custom-call = (f32[8,2]{1,0}, s32[8,2]{1,0}) custom-call(%x), custom_call_target="TopK", metadata={op_name="jit(f)/top_k"}
  %while.7 = (s32[], f32[8,4]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %copy.1 = f32[8,4]{1,0} copy(%wrapped_scatter)
}
"""


def test_hlo_ops_sorts_a_modules_instructions_into_products_and_the_rest():
  """Dots and library (kCustom) fusions are products, control flow is neither, and the rest
  are named by the jax operation in their metadata, else by their opcode."""
  assert bench.hlo_ops(_HLO) == {
      "ynn_fusion.3": ("product", "dot_general"), "dot_general.2": ("product", "dot"),
      "wrapped_scatter": ("rest", "scatter-add"), "custom-call": ("rest", "top_k"),
      "while.7": ("control", "while"), "copy.1": ("rest", "copy")}


@pytest.mark.skipif(not shutil.which("taskset"), reason="needs taskset (util-linux)")
def test_breakdown_splits_the_layer_and_dense_into_products_and_the_rest(tmp_path):
  """bench_moe --breakdown, pinned to one core: for both the layer and dense, products and
  the rest nearly fill the traced calls' time, dense's products are most of dense, and
  the table shows the MoE's rest by jax operation. Unpinned, it refuses. Compiled as the
  benchmark is, not with the suite's fast-compile flags (subproc): their unfused programs
  are many small thunks, each of which the trace slows."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "layer.json"
  cmd = [sys.executable, "-m", "experiments.bench_moe", "--T=2048", "--d=128",
         "--shapes=4:128:2", "--backend=dropless", "--repeats=3", "--breakdown", f"--out={out}"]
  core = str(min(os.sched_getaffinity(0)))
  proc = subprocess.run(["taskset", "-c", core, *cmd], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (x,) = json.loads(out.read_text())["layer"]
  for name in ("moe", "dense"):
    b = x["breakdown"][name]
    assert b["products_s"] > 0 and b["rest_s"] > 0
    assert 0.6 * b["wall_s"] < b["products_s"] + b["rest_s"] < 1.05 * b["wall_s"]
  dense = x["breakdown"]["dense"]
  assert dense["products_s"] > dense["rest_s"]
  rest = x["breakdown"]["moe"]["rest_by_op"]
  assert sum(rest.values()) <= x["breakdown"]["moe"]["rest_s"] + 1e-9
  assert set(rest) & {"gather", "scatter-add", "dynamic_update_slice", "select_n"}, rest
  table = render_results.layer(json.loads(out.read_text()))
  largest = max(rest, key=rest.get)  # listed first
  assert "| the MoE's rest by jax operation, s |" in table
  assert f"| {largest} {rest[largest]:.4f}, " in table
  if len(os.sched_getaffinity(0)) > 1:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "run pinned to one" in proc.stderr


def test_a_kernel_that_raises_is_reported_and_the_others_still_run(monkeypatch):
  def broken(*args):
    raise RuntimeError("no Triton here")
  monkeypatch.setattr(kernel_check, "check_permute", broken)
  errors = {}
  errs = kernel_check.run_all(kernel_check.Sizes(t=16, d=8, f=8, e=3, k=2), "float32", 0, errors)
  assert errors == {"permute": "RuntimeError: no Triton here"}
  assert "gmm" in errs and "layer grads" in errs and "permute" not in errs


def test_provenance_names_the_cores_a_pinned_process_may_use(monkeypatch):
  """A process pinned with taskset reports the cores it may run on, not the machine's."""
  monkeypatch.setattr(os, "cpu_count", lambda: 4)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2}, raising=False)
  assert bench.provenance("x")["machine"].endswith(", 1 of 4 cores (pinned)")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
  assert bench.provenance("x")["machine"].endswith(", 4 cores")


def test_provenance_names_the_cpu_model(tmp_path):
  """Results name the CPU model (/proc/cpuinfo's first 'model name'), '' where unknown."""
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU 9000 @ 3GHz\n"
                  "processor\t: 1\nmodel name\t: Other\n")
  assert bench.cpu_model(str(info)) == "Test CPU 9000 @ 3GHz"
  assert bench.cpu_model(str(tmp_path / "missing")) == ""
  info.write_text("processor\t: 0\n")
  assert bench.cpu_model(str(info)) == ""


def test_temp_bytes_counts_a_materialised_intermediate():
  """(x @ x) @ x needs x @ x in a temporary buffer: 128*128 float32 at least."""
  x = jnp.ones((128, 128), jnp.float32)
  assert bench.temp_bytes(jax.jit(lambda x: (x @ x) @ x).lower(x).compile()) >= 128 * 128 * 4


@pytest.mark.parametrize("routing", ["strided", "random"])
def test_the_equal_groups_loop_is_every_token_through_its_k_experts(routing):
  """bench_floor's block loops (bench._equal_groups_loop): each expert T*k/E tokens, each
  token k distinct experts, neighbouring experts the same tokens (strided) or disjoint ones
  (random); the loop's loss is plain jnp SwiGLUs summed over every token's experts."""
  t, d, f, e, k = 48, 8, 4, 6, 2
  expert_TxK = (bench.strided_experts if routing == "strided" else bench.random_equal_experts)(
      t, k, e)
  assert expert_TxK.shape == (t, k) and (np.bincount(expert_TxK.ravel(), minlength=e) ==
                                         t * k // e).all()
  assert all(len(set(row)) == k for row in expert_TxK.tolist())
  tokens = [set(np.nonzero((expert_TxK == x).any(1))[0].tolist()) for x in range(e)]
  shared = [len(tokens[x] & tokens[x + 1]) for x in range(e - 1)]
  assert (max(shared) > 0) if routing == "strided" else (max(shared) == 0)
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (t, d))
  wg, wu, wd = (jax.random.normal(key, shape) for key, shape in
                zip(ks[1:], ((e, d, f), (e, d, f), (e, f, d))))
  want = 0.0
  for j in range(k):
    g, u, dn = (w[expert_TxK[:, j]] for w in (wg, wu, wd))  # [T, ...]: each token's expert
    h = jax.nn.silu(jnp.einsum("td,tdf->tf", x, g)) * jnp.einsum("td,tdf->tf", x, u)
    want += jnp.einsum("tf,tfd->td", h, dn).sum()
  got = bench._equal_groups_loop(expert_TxK, e, jnp.float32)(x, wg, wu, wd)
  assert jnp.allclose(got, want, rtol=1e-5), (got, want)


def test_random_equal_experts_names_shapes_it_cannot_split():
  with pytest.raises(ValueError, match="E=6 must be a multiple of k=4"):
    bench.random_equal_experts(48, 4, 6)


def test_a_summary_gives_each_ratio_as_its_range_over_the_runs(tmp_path, monkeypatch):
  """render_results.summary: bench_moe --out files named in a summary_*.json, each ratio
  as min-max over the runs (the peer: MoE seconds over the fastest transformers block)."""
  def run(name, ratio, moe_s, floor, loop=None):
    r = {"command": f"python -m experiments.bench_moe --out={name}", "machine": "m",
         "device": "cpu", "jax": "0", "date": "2026-12-05",
         "layer": [{"E": 8, "f": 4, "k": 2, "backend": "dropless", "ratio": ratio,
                    "moe_s": moe_s}],
         "transformers": [{"E": 8, "f": 4, "k": 2,
                           "seconds": {"eager": 2.0, "grouped_mm": 4.0, "dense": 1.0}}],
         "floor": [{"E": 8, "f": 4, "k": 2, "ratio": floor,
                    **({"loop_ratio": loop} if loop else {})}]}
    (tmp_path / f"{name}.json").write_text(json.dumps(r))
  run("a", 1.1, 1.0, 0.9, 1.0)
  run("b", 1.3, 1.5, 0.95)
  monkeypatch.setattr(render_results, "RESULTS", str(tmp_path))
  table = render_results.renderer("summary_x")({"runs": ["a", "b"]}).splitlines()
  assert table[0].startswith("2 runs (`a.json`, `b.json`; m, cpu, jax 0, 2026-12-05). "
                             "The first: `python -m experiments.bench_moe --out=a`.")
  assert table[-1] == "| 8 | 4 | 2 | dropless | 1.100-1.300 | 0.500-0.750 | 0.900-0.950 | 1.000 |"


def test_alternating_train_benchmarks_time_the_models_in_turn(monkeypatch):
  """bench_train_alternating builds every model first, then times round r of each model
  before round r + 1 of any, and keeps each model's best round."""
  calls = []

  def runner(cfg, batch, length, steps):
    seconds = iter(cfg["rounds"])

    def run_round():
      calls.append(cfg["name"])
      return next(seconds)
    return run_round, lambda: {"built": cfg["name"]}

  monkeypatch.setattr(bench, "_train_runner", runner)
  monkeypatch.setattr(bench, "_train_result", lambda cfg, figures, s: {**figures, "step_s": s})
  out = bench.bench_train_alternating([{"name": "a", "rounds": [3.0, 2.0, 4.0]},
                                       {"name": "b", "rounds": [1.0, 5.0, 6.0]}], 1, 1, 1, 3)
  assert calls == ["a", "b"] * 3
  assert out == [{"built": "a", "step_s": 2.0}, {"built": "b", "step_s": 1.0}]
