"""kernels.linear against the plain product x @ w: the output and both gradients, relative RMS error below 1e-4 in float32.
Shapes cover a 3-d input, a token count that splits the weight gradient into slices (4096 and 3000 tokens) and one that does not,
and widths that are no multiple of a tensor-core tile."""
import numpy as np
import pytest
from tinygrad import Tensor
import kernels, mc

def _grads(fn, xa, wa, ga) -> list[np.ndarray]:
  x, w = Tensor(xa), Tensor(wa)
  y = fn(x, w)
  return [t.float().numpy() for t in (y, *(y.float() * Tensor(ga)).sum().gradient(x, w))]

@pytest.mark.parametrize("shape, N", [((3, 37, 24), 40), ((2, 1100), 12), ((4096, 64), 48), ((3000, 20), 36)])
def test_linear(shape, N):
  rng = np.random.default_rng(sum(shape) + N)
  xa, wa = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((shape[-1], N)).astype(np.float32)
  ga = rng.standard_normal((*shape[:-1], N)).astype(np.float32)
  ref, got = _grads(lambda x, w: x @ w, xa, wa, ga), _grads(kernels.linear, xa, wa, ga)
  for name, r, g in zip(("y", "dx", "dw"), ref, got):
    assert g.shape == r.shape, name
    assert np.sqrt(np.mean((g - r) ** 2)) <= 1e-4 * np.sqrt(np.mean(r ** 2)), name

def test_slices():
  # slices of at least 512 tokens, at most 16, each the same length
  assert [kernels._slices(K) for K in (1, 1000, 1024, 3000, 4096, 8192, 16384, 1 << 20)] == [1, 1, 2, 4, 8, 16, 16, 16]

def test_linear_mma_emulated():
  # the hand-written tensor-core product (kernels._mma_fxn) on tinygrad's Python emulator of CUDA's m16n8k16 tiles, as the CPU
  # has none: kernels.linear's output and both gradients in bfloat16 against float32 products of the same rounded inputs. The
  # three products take different tiles (32 x 32, 128 x 64, 64 x 32 in two slices) and every operand layout
  from tinygrad import dtypes
  from tinygrad.helpers import Context
  bf, rng = dtypes.bfloat16, np.random.default_rng(7)
  xa, wa, ga = rng.standard_normal((2, 512, 64)), rng.standard_normal((64, 96)) / 8, rng.standard_normal((2, 512, 96))
  with Context(DEV="PYTHON::sm_80"):   # an Ampere's tensor cores, emulated
    x, w, g = (Tensor(a.astype(np.float32)) for a in (xa, wa, ga))
    x = x.cast(bf).contiguous()
    assert kernels._tiles(x.reshape(-1, 64), 1024) == "tc" and kernels._mma_tiles(64, 96, 512) == (64, 32, 64)
    y = kernels.linear(x, w)
    got = [t.float().numpy() for t in (y, *(y.float() * g).sum().gradient(x, w))]
  xr, wr, gr = x.float().numpy(), w.cast(bf).float().numpy(), g.cast(bf).float().numpy()
  for name, r, o in zip(("y", "dx", "dw"), (xr @ wr, gr @ wr.T, np.einsum("bld,bln->dn", xr, gr)), got):
    assert o.shape == r.shape, name
    assert np.sqrt(np.mean((o - r) ** 2)) <= 1e-2 * np.sqrt(np.mean(r ** 2)), name

def test_linear_padded_emulated():
  # kernels.linear on a projection whose widths do not tile by 32 (the gates' 3 H outputs; an odd input width too): padded with
  # zeros onto the hand-written tensor-core product (no tinygrad-scheduled product left), on the emulated tensor cores, output
  # and both gradients against float32 products of the same rounded inputs
  from tinygrad import dtypes
  from tinygrad.helpers import Context
  from tinygrad.uop.ops import Ops, KernelInfo
  bf, rng = dtypes.bfloat16, np.random.default_rng(3)
  for K, N in ((64, 24), (40, 96)):
    xa, wa, ga = rng.standard_normal((2, 256, K)), rng.standard_normal((K, N)) / 8, rng.standard_normal((2, 256, N))
    with Context(DEV="PYTHON::sm_80"):
      x, w, g = (Tensor(a.astype(np.float32)) for a in (xa, wa, ga))
      x = x.cast(bf).contiguous()
      y = kernels.linear(x, w)
      outs = [y, *(y.float() * g).sum().gradient(x, w)]
      names = {u.arg.name for o in outs for u in o.uop.toposort() if u.op is Ops.SINK and isinstance(u.arg, KernelInfo)}
      assert any(n.startswith("mma") for n in names) and not any(n.startswith("gemm") for n in names), names
      got = [t.float().numpy() for t in outs]
    xr, wr, gr = x.float().numpy(), w.cast(bf).float().numpy(), g.cast(bf).float().numpy()
    for name, r, o in zip(("y", "dx", "dw"), (xr @ wr, gr @ wr.T, np.einsum("bld,bln->dn", xr, gr)), got):
      assert o.shape == r.shape, (K, N, name)
      assert np.sqrt(np.mean((o - r) ** 2)) <= 1e-2 * np.sqrt(np.mean(r ** 2)), (K, N, name)

@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_mma_emulated(monkeypatch, prefetch):
  # kernels._mma_fxn's variants (kernels.MMA_PREFETCH) on the emulated tensor cores against float32 products of the same rounded
  # inputs, one product per operand layout, each of 3 to 8 k tiles (the pipeline's first, steady and last iterations): tiles of
  # 64 x 32 x 32 in half, 32 x 64 x 32 and 32 x 32 x 64 in two slices of k in bfloat16
  from tinygrad import dtypes
  from tinygrad.helpers import Context
  monkeypatch.setattr(kernels, "MMA_PREFETCH", prefetch)
  rng = np.random.default_rng(11)
  for (M, K, N), a_t, b_t, dt in [((64, 160, 32), False, False, dtypes.half), ((32, 96, 64), False, True, dtypes.bfloat16),
                                  ((32, 1024, 32), True, False, dtypes.bfloat16)]:
    A, B = rng.standard_normal((K, M) if a_t else (M, K)), rng.standard_normal((N, K) if b_t else (K, N))
    with Context(DEV="PYTHON::sm_80"):
      At, Bt = (Tensor(x.astype(np.float32)).cast(dt).contiguous() for x in (A, B))
      assert kernels._tiles(At, M) == "tc"
      got, Ar, Br = kernels._gemm(At, Bt, a_t, b_t).float().numpy(), At.float().numpy(), Bt.float().numpy()
    ref = (Ar.T if a_t else Ar) @ (Br.T if b_t else Br)
    assert np.sqrt(np.mean((got - ref) ** 2)) <= 1e-2 * np.sqrt(np.mean(ref ** 2)), (M, K, N)

@pytest.mark.parametrize("shape", [(1, 256, 768), (3, 256, 12), (16, 704, 256), (1, 1, 8)])
def test_linear_rows(shape):
  # a decode step's few rows (up to kernels.ROWS), one token's weight gradient included (a reduce over one row)
  M, K, N = shape
  rng = np.random.default_rng(M + K + N)
  xa, wa, ga = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (K, N), (M, N)))
  for name, r, g in zip(("y", "dx", "dw"), _grads(lambda x, w: x @ w, xa, wa, ga), _grads(kernels.linear, xa, wa, ga)):
    assert np.sqrt(np.mean((g - r) ** 2)) <= 1e-4 * np.sqrt(np.mean(r ** 2)), name

def _cuda_renderer():
  # tinygrad's CUDA code generator for an H100 (sm_90), built without a GPU or NVRTC: kernels are planned here, not compiled
  from tinygrad.renderer.cstyle import CUDARenderer, CStyleLanguage
  from tinygrad.renderer import Target
  from tinygrad.codegen.opt.tc import get_cuda
  ren = CUDARenderer.__new__(CUDARenderer)
  CStyleLanguage.__init__(ren, Target("CUDA", "", "sm_90"))
  ren.tensor_cores = get_cuda("sm_90")
  return ren

def _mma_plan(sink) -> str:
  # the linearized order of an mma kernel, runs collapsed: R a loop, E its end, G a 16-byte global load, S a 16-byte shared store,
  # B a barrier, W an mma
  import re
  from tinygrad.uop.ops import Ops
  from tinygrad.dtype import AddrSpace
  from tinygrad.codegen.late.linearizer import linearize
  ev = {Ops.RANGE: "R", Ops.END: "E", Ops.BARRIER: "B", Ops.WMMA: "W"}
  wide = lambda u, op, space: u.op is op and u._shape == (4,) and u.src[0].addrspace is space
  s = "".join(ev.get(u.op, "G" if wide(u, Ops.LOAD, AddrSpace.GLOBAL) else "S" if wide(u, Ops.STORE, AddrSpace.LOCAL) else "")
              for u in linearize(sink))
  return re.sub(r"(.)\1+", r"\1", s)

@pytest.mark.parametrize("tiles, dtype, M, K, N", [("tc", "bfloat16", 8192, 256, 768), ("tc", "bfloat16", 16384, 1376, 512),
                                                   ("tc", "half", 16384, 512, 1536), ("simt", "float32", 8192, 704, 256),
                                                   ("simt", "float32", 8192, 256, 12), ("rows", "float32", 16, 256, 768),
                                                   ("rows", "bfloat16", 1, 704, 256), ("rows", "float32", 3, 256, 12),
                                                   ("tc", "bfloat16", 8192, 256, 12)])
def test_linear_tiles_apply_on_cuda(monkeypatch, tiles, dtype, M, K, N):
  # the hand-picked schedules (kernels._tc_opts, kernels._rows_opts) of the forward and both gradient products apply to the
  # kernels on CUDA, where the CPU's tests cannot run them; "tc" ones do use the tensor cores wherever _tc_opts gives tiles, and
  # the hand-written ones (kernels._mma_fxn, where the shapes tile by 32) stage their tiles with 16-byte loads, in both variants
  from tinygrad import dtypes
  from tinygrad.uop.ops import Ops, KernelInfo
  from tinygrad.codegen import full_rewrite_to_sink
  from tinygrad.codegen.opt import OptOps
  ren = _cuda_renderer()
  # kernels._tiles as it chooses on an H100: decode rows up to kernels.ROWS, tensor-core tiles for half inputs
  monkeypatch.setattr(kernels, "_tiles", lambda A, rows: "rows" if rows <= kernels.ROWS else "tc" if A.dtype != dtypes.float else "simt")
  x, w, g = (Tensor.empty(*s, dtype=getattr(dtypes, dtype)) for s in ((M, K), (K, N), (M, N)))
  def products(prefetch:int) -> list:
    monkeypatch.setattr(kernels, "MMA_PREFETCH", prefetch)
    outs = (kernels._gemm(x, w), kernels._gemm(g, w, b_t=True), kernels._gemm(x, g, a_t=True))
    return [u for t in outs for u in t.linear_with_vars()[0].toposort() if u.op is Ops.SINK and isinstance(u.arg, KernelInfo)
            and u.arg.name.startswith(("gemm", "mma"))]
  asts, piped = products(0), [products(1), products(2)]
  assert len(asts) == 3 and all(a.arg.name.startswith("mma") == (tiles == "tc" and kernels._mma_tiles(M, N, K) is not None) for a in asts)
  for a, *p in zip(asts, *piped):
    sink = full_rewrite_to_sink(a, ren)
    if a.arg.name.startswith("mma"):
      assert {Ops.WMMA, Ops.BARRIER} <= {u.op for u in sink.toposort()}
      assert any(u.op is Ops.LOAD and u.dtype == dtypes.uint32 and u._shape == (4,) for u in sink.toposort())
      # the k loop without prefetch opens with its tile's loads and stores (no loop where there is one k tile). With it, the next
      # tile's loads come before the mma, then the stores (1: between two barriers, 2: before one), where the tiles allow it: all
      # of the gpu shape's products, whose tiles are 128 x 128
      plan, plans = _mma_plan(sink), [_mma_plan(full_rewrite_to_sink(u, ren)) for u in p]
      assert all(u.arg.name == a.arg.name for u in p) and plan in ("RGSERGSEBRWEBE", "RGSERGSEBRWE")
      for got, want in zip(plans, ("RGSERGSEBRGRWEBSBE", "RGSERGSEBRGRWESBE")):
        assert got == want or (got == plan and (M, K, N) != (16384, 512, 1536))
      continue
    applied = sink.arg.applied_opts
    assert applied == a.arg.opts_to_apply or a.arg.opts_to_apply is None
    if tiles == "tc" and a.arg.opts_to_apply is not None: assert applied[0].op is OptOps.TC
    if tiles == "rows" and a.arg.opts_to_apply is not None: assert all(o.op is not OptOps.TC for o in applied)
  assert sum(a.arg.opts_to_apply is not None for a in asts) >= (1 if tiles != "rows" else 2) - (N % 64 > 0)   # rows: the forward and dx

def test_wide_blocks_on_cuda(monkeypatch):
  # kernels._wide on an H100's plan: a flat elementwise kernel's 32-thread blocks become WIDE_BLOCKS threads along the same axis,
  # a reduction keeps tinygrad's own schedule
  from tinygrad.uop.ops import Ops, KernelInfo
  from tinygrad.codegen import full_rewrite_to_sink
  from tinygrad.codegen.opt import OptOps
  from tinygrad.helpers import Context
  import tinygrad.codegen.opt.heuristic as heuristic
  ren = _cuda_renderer()
  a, b = Tensor.empty(16384, 512), Tensor.empty(16384, 512)
  def threads(t:Tensor, wide:bool) -> int:
    monkeypatch.setattr(heuristic, "hand_coded_optimizations", kernels._wide if wide else kernels._hand_coded)
    ast = next(u for u in t.linear_with_vars()[0].toposort() if u.op is Ops.SINK and isinstance(u.arg, KernelInfo))
    with Context(NOOPT=0): opts = full_rewrite_to_sink(ast, ren).arg.applied_opts   # the tests' CPU default is NOOPT=1
    return int(np.prod([o.arg for o in opts if o.op is OptOps.LOCAL]))
  assert threads(a + b, False) == 32 and threads(a + b, True) == kernels.WIDE_BLOCKS == 128
  assert threads((a * b).sum(-1), True) == threads((a * b).sum(-1), False)

def test_lanes_along_contiguous_axis(monkeypatch):
  # kernels._wide on an H100's plan of a norm weight's product, (16384, 512) x (512,): a warp's 32 lanes take adjacent float4s of a
  # row, where tinygrad's heuristic, which puts lanes first along an axis an input is broadcast over, spaced them a row or more apart
  import re
  from tinygrad.uop.ops import Ops, KernelInfo
  from tinygrad.codegen import full_rewrite_to_sink
  from tinygrad.codegen.late.linearizer import linearize
  from tinygrad.helpers import Context
  import tinygrad.codegen.opt.heuristic as heuristic
  ren = _cuda_renderer()
  x, w = Tensor.empty(16384, 512), Tensor.empty(512)
  def lane_stride(wide:bool) -> int:
    # elements between the addresses of lanes 0 and 1 (threadIdx.x), from the rendered CUDA source
    monkeypatch.setattr(heuristic, "hand_coded_optimizations", kernels._wide if wide else kernels._hand_coded)
    ast = next(u for u in (x * w).cast("bfloat16").linear_with_vars()[0].toposort() if u.op is Ops.SINK and isinstance(u.arg, KernelInfo))
    with Context(NOOPT=0): src = ren.render(list(linearize(full_rewrite_to_sink(ast, ren))))
    return 2 ** int(re.search(r"lidx0<<(\d+)", src).group(1))
  assert lane_stride(False) >= 512 and lane_stride(True) == 4

def test_wide_blocks_in_compile_workers():
  # tinygrad compiles a graph's kernels in spawned worker processes: the heuristic there is kernels._wide too
  from tinygrad.helpers import Context
  from tinygrad.engine.worker import get_worker_pool, terminate_worker_pool
  with Context(PARALLEL=2): pool = get_worker_pool()
  try: assert pool.apply(eval, ("__import__('tinygrad.codegen.opt.heuristic', fromlist=['_']).hand_coded_optimizations.__name__",)) == "_wide"
  finally: terminate_worker_pool()

def test_mma_swizzle_conflict_free():
  # kernels._rot's layout: in a shared tile of n 16-byte chunks a row (no padding), the 8 rows that one ldmatrix phase reads at one
  # chunk column (rows 8i .. 8i+7) fall in 8 different groups of 4 banks (the word address / 4, mod 8), for every column
  for n in (2, 4, 8, 16):
    for r0 in range(0, 64, 8):
      for c in range(n):
        groups = {(r * n + (c + kernels._rot(r, n)) % n) % 8 for r in range(r0, r0 + 8)}
        assert len(groups) == 8, (n, r0, c)

@pytest.mark.parametrize("prefetch, stages, swizzle", [(3, 3, 0), (4, 4, 0), (4, 3, 1)])
def test_mma_async_plan(monkeypatch, prefetch, stages, swizzle):
  # kernels._mma_fxn's async variants (cp.async copies; 4: fragments by ldmatrix and the mma as one asm block) in their CUDA
  # source, for the gpu shape's products and the MLP's 1376 columns (narrower tiles, several copies a thread): tiles 0 .. stages-3
  # copied before the k loop; each iteration copies one tile ahead, closes its group and waits for all but stages-2, then one
  # barrier before the fragment reads; nothing left in flight at the end. Run on a GPU by `MMA_PREFETCH=4 bench.py check`
  import re
  from tinygrad import dtypes
  from tinygrad.uop.ops import Ops, KernelInfo
  from tinygrad.codegen import full_rewrite_to_sink
  from tinygrad.codegen.late.linearizer import linearize
  ren = _cuda_renderer()
  monkeypatch.setattr(kernels, "_tiles", lambda A, rows: "tc")
  monkeypatch.setattr(kernels, "MMA_PREFETCH", prefetch)
  monkeypatch.setattr(kernels, "MMA_STAGES", stages)
  monkeypatch.setattr(kernels, "MMA_SWIZZLE", swizzle)
  for M, K, N in ((16384, 512, 1536), (16384, 512, 1376)):
    x, w, g = (Tensor.empty(*s, dtype=dtypes.bfloat16) for s in ((M, K), (K, N), (M, N)))
    for t in (kernels._gemm(x, w), kernels._gemm(g, w, b_t=True), kernels._gemm(x, g, a_t=True)):
      ast = next(u for u in t.linear_with_vars()[0].toposort() if u.op is Ops.SINK and isinstance(u.arg, KernelInfo) and u.arg.name.startswith("mma"))
      src = ren.render(list(linearize(full_rewrite_to_sink(ast, ren))))
      # the kernel's statements in order, runs collapsed: C a copy, M a commit, W commit-and-wait, B a barrier, L an ldmatrix block,
      # H a tinygrad mma, A the final wait
      ev = [("C", "cp.async.cg"), ("W", "cp.async.wait_group"), ("M", "cp.async.commit_group"), ("A", "cp.async.wait_all"),
            ("B", "__syncthreads"), ("L", "ldmatrix"), ("H", "__WMMA_")]
      body = src[src.index("__global__"):].splitlines()
      plan = re.sub(r"(.)\1+", r"\1", "".join(next((c for c, key in ev if key in line), "") for line in body).replace("{", ""))
      assert re.fullmatch("(CM){%d}CWB%s+AB" % (stages - 2, "L" if prefetch == 4 else "H"), plan), (M, K, N, ast.arg.name, plan)
      assert src.count("__syncthreads") == 2 and f"wait_group {stages - 2}" in src
      # swizzled: no padding, so that 3 stages of 128 x 128 tiles with k tiles of 32 fill the 48 KB exactly
      smem = 4 * sum(int(n) for n in re.findall(r"__shared__ __align__\(16\) uint buf\d+\[(\d+)\]", src))
      if swizzle and N == 1536: assert smem == 3 * 4 * 2 * 128 * 16, smem

def test_bf16_vectors(monkeypatch):
  # kernels' BF16_VECTORS on a CUDA renderer: a bfloat16 elementwise kernel (the MLP's silu(a) * b at the gpu shape) moves its
  # values as 4-wide vectors, where tinygrad's own pass moves each alone; the same kernel in float32 is untouched by it
  import tinygrad.codegen as codegen
  from tinygrad import dtypes
  from tinygrad.helpers import Context
  from tinygrad.uop.ops import Ops, KernelInfo
  from tinygrad.codegen import full_rewrite_to_sink
  from tinygrad.codegen.late.linearizer import linearize
  ren = _cuda_renderer()
  def source(dt) -> str:
    a, b = (Tensor.empty(16384, 1376, dtype=dt) for _ in range(2))
    ast = next(u for u in (a.silu() * b).contiguous().linear_with_vars()[0].toposort() if u.op is Ops.SINK and isinstance(u.arg, KernelInfo))
    with Context(NOOPT=0): return ren.render(list(linearize(full_rewrite_to_sink(ast, ren))))   # (the CPU tests run NOOPT=1)
  assert kernels.BF16_VECTORS and codegen.memory_coalescing is kernels._memory_coalescing
  src = source(dtypes.bfloat16)
  assert src.count("*((nv_bfloat164*)") == 3 and "make_bfloat162" in src, src   # two vector loads, one vector store
  f32 = source(dtypes.float)
  monkeypatch.setattr(codegen, "memory_coalescing", kernels._coalesce.memory_coalescing)
  assert "nv_bfloat164" not in source(dtypes.bfloat16) and source(dtypes.float) == f32

def test_store_hazards_memoized(monkeypatch):
  # kernels' memoized answers to tinygrad's two store-hazard questions against tinygrad's own walks, for every store of a small
  # titans+grm training step (optimizer assigns included) and of assigns that do read their buffer through a permute or flip.
  # (Spied on in kernels: tinygrad's pattern matchers keep a copy of the globals their functions saw when first compiled)
  from tinygrad import dtypes
  from tinygrad.helpers import Context
  import tinygrad.schedule.rangeify as rangeify
  import train
  from mc import MCConfig, Model
  assert kernels.FAST_HAZARDS and hasattr(rangeify, "_tinymc_hazard")
  tinygrads, reads, unsafe, asked = rangeify._tinymc_hazard.keywords["tinygrads"], kernels._src_reads, kernels._unsafe_path, []
  def src_reads(src, base):
    assert (ours := reads(src, base)) == (base in src.toposort(enter_calls=False))
    return ours
  def unsafe_path(src, base, target, shrink):
    assert (ours := unsafe(src, base, target, shrink)) == (tinygrads(target, src) is not None)
    asked.append(ours)
    return ours
  monkeypatch.setattr(kernels, "_src_reads", src_reads)
  monkeypatch.setattr(kernels, "_unsafe_path", unsafe_path)
  cfg = MCConfig(dim=32, n_layers=1, n_heads=2, segment=16, chunk=8, core="titans", agg="grm")
  lm = Model(cfg)
  opt = train.make_optimizer(lm, train.TrainConfig(model=cfg))
  x = Tensor.randint(2, 40, high=cfg.vocab, dtype=dtypes.int32)
  with Context(TRAINING=1, SCACHE=0):   # (a schedule another test cached would ask nothing)
    opt.zero_grad()
    lm(x).sparse_categorical_crossentropy(x, ignore_index=-100).backward()
    outs = opt.schedule_step()
    outs[0].linear_with_vars(*outs[1:])
    a, b = (Tensor.arange(16).reshape(4, 4).float().contiguous().realize() for _ in range(2))
    a.assign(a.T + 1).realize()
    b.assign(b.flip(0) * 2).realize()
  assert len(asked) > 20 and sum(asked) >= 2 and not all(asked)
  assert np.array_equal(a.numpy(), np.arange(16).reshape(4, 4).T + 1) and np.array_equal(b.numpy(), np.arange(16).reshape(4, 4)[::-1] * 2)

def test_kernel_output_not_copied():
  # a kernel's output reshaped into the next kernel's input passes as it is (kernels._c): tinygrad copies it when a contiguous
  # follows the view (the qkv projection's 50 MB into the conv, a layer at the gpu shape); an expression still gets realized
  from tinygrad.uop.ops import Ops
  x, w, cw = Tensor.randn(64, 32).realize(), Tensor.randn(32, 48).realize(), Tensor.randn(4, 48).realize()
  def kernels_run(t:Tensor) -> list[str]: return [u.src[0].arg.name for u in t.linear_with_vars()[0].src if u.src[0].op is Ops.SINK]
  assert kernels_run(kernels.causal_conv(kernels._gemm(x, w).reshape(2, 32, 48), cw)) == ["gemm", "conv"]
  assert len(kernels_run(kernels.causal_conv((x @ w + 1).reshape(2, 32, 48), cw))) == 2
  y = kernels.causal_conv(kernels._gemm(x, w).reshape(2, 32, 48), cw).numpy()
  np.testing.assert_allclose(y, mc.causal_conv_ref((x @ w).reshape(2, 32, 48), cw).numpy(), rtol=1e-5, atol=1e-5)
