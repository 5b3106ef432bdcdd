"""GPU kernels (Triton) vs their CPU references, and the GPU executor vs the CPU runtime (needs CUDA).

Every kernel gets fresh random inputs on the device; the reference runs the same inputs on the CPU in fp32.
Tolerance: relative L2 ||got - ref|| / ||ref|| <= 1e-2 for bf16 inputs and outputs (bf16 rounds to 2^-8 ~ 4e-3
per element; kernels accumulate in fp32, tf32 in the chunked delta rule's state products), outputs and states.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available: the GPU kernels and executor need an NVIDIA GPU", allow_module_level=True)
triton = pytest.importorskip("triton", reason="the GPU kernels need Triton")
import triton.language as tl  # noqa: E402

from nextq.quant import quantize  # noqa: E402
from nextq.runtime import cuda_ops, ops  # noqa: E402
from nextq.runtime.triton import gdr_chunk, gdr_recurrent, norms  # noqa: E402
from nextq.runtime.triton.moe_grouped import _w_tile  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = 1e-2  # bf16 budget, see the module docstring


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float().cpu(), ref.float().cpu()
    assert torch.isfinite(got).all(), "non-finite values in the kernel output"
    return float((got - ref).norm() / ref.norm())


def gdr_inputs(B, T, Hk, Hv, Dk, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, Hk, Dk, generator=g), torch.randn(B, T, Hk, Dk, generator=g),
            torch.randn(B, T, Hv, Dv, generator=g), -torch.rand(B, T, Hv, generator=g) * 3,
            torch.rand(B, T, Hv, generator=g), torch.randn(B, Hv, Dk, Dv, generator=g) * 0.1)


def on_gpu(args, dtype=torch.bfloat16):
    """q, k, v, beta in `dtype`; g (log decay) and the state stay fp32, as the runtime passes them."""
    q, k, v, g, beta, s = args
    return (q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), g.to(DEV), beta.to(DEV, dtype), s.to(DEV))


def cpu_ref(args_gpu, fn):
    """The CPU reference on exactly the (bf16-rounded) values the kernel saw, in fp32."""
    return fn(*(a.float().cpu() for a in args_gpu))


# T: decode, ragged, aligned, spilling; Hv = Hk, 2 Hk, 3 Hk; non-power-of-two head dims; the real 128 x 128
@pytest.mark.parametrize("T", [1, 7, 64, 257])
@pytest.mark.parametrize("B,Hk,Hv,Dk,Dv", [(2, 2, 4, 12, 20), (2, 2, 4, 128, 128)])
def test_delta_rule_kernels_match_reference(T, B, Hk, Hv, Dk, Dv):
    args = on_gpu(gdr_inputs(B, T, Hk, Hv, Dk, Dv, seed=T + Dk))
    o_ref, s_ref = cpu_ref(args, ops.gated_delta_rule_recurrent)
    for fn in (gdr_recurrent.gated_delta_rule_recurrent, gdr_chunk.gated_delta_rule_chunked):
        o, s = fn(*args)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert rel(o, o_ref) <= TOL, fn.__name__
        assert rel(s, s_ref) <= TOL, fn.__name__
    # the registered op dispatches to the kernels on CUDA
    o, s = torch.ops.nextq.gated_delta_rule(*args)
    assert rel(o, o_ref) <= TOL and rel(s, s_ref) <= TOL


@pytest.mark.parametrize("T", [1, 3])
def test_recurrent_kernel_with_raw_gates(T):
    """The decode step's form: a, b straight from the projection, g = -exp(A_log) softplus(a + dt_bias) and
    beta = sigmoid(b) inside the kernel (softplus's pass-through above 20 included), state updated in place."""
    import torch.nn.functional as F

    q, k, v, _, _, s0 = on_gpu(gdr_inputs(2, T, 2, 4, 128, 128, seed=40 + T))
    g = torch.Generator().manual_seed(T)
    a_raw, b_raw = torch.randn(2, T, 4, generator=g) * 4, torch.randn(2, T, 4, generator=g)
    a_raw[0, 0, 0] = 30.0
    a_log, dt_bias = torch.rand(4, generator=g) * 2, torch.randn(4, generator=g) * 0.5
    gl = -a_log.exp() * F.softplus(a_raw + dt_bias)
    o_ref, s_ref = ops.gated_delta_rule_recurrent(q.float().cpu(), k.float().cpu(), v.float().cpu(), gl,
                                                  torch.sigmoid(b_raw), s0.cpu())
    out, state = torch.empty_like(v), s0.clone()
    gdr_recurrent.gdr_recurrent_into(q, k, v, a_raw.to(DEV), b_raw.to(DEV), state, out, state,
                                     gates=(a_log.to(DEV), dt_bias.to(DEV)))
    assert rel(out, o_ref) <= TOL and rel(state, s_ref) <= TOL


def test_chunked_delta_rule_long_sequence_state():
    """4096 tokens at the real head sizes: the state crosses 64 chunk boundaries without drifting."""
    args = on_gpu(gdr_inputs(1, 4096, 2, 4, 128, 128, seed=11))
    o_ref, s_ref = cpu_ref(args, ops.gated_delta_rule_chunked)
    o, s = gdr_chunk.gated_delta_rule_chunked(*args)
    assert rel(o, o_ref) <= TOL and rel(s, s_ref) <= TOL


@pytest.mark.parametrize("B,T,C,K", [(2, 1, 6, 4), (1, 2, 10, 4), (2, 37, 300, 4), (1, 300, 8192, 4), (1, 5, 7, 3)])
def test_causal_conv_kernel_matches_reference(B, T, C, K):
    g = torch.Generator().manual_seed(C)
    x = torch.randn(B, T + 3, C, generator=g)[:, 1:T + 1].to(DEV, torch.bfloat16)  # strided, as a projection slice
    w = torch.randn(C, K, generator=g).to(DEV, torch.bfloat16)
    s = torch.randn(B, C, K - 1, generator=g).to(DEV, torch.bfloat16)
    y_ref, s_ref = ops.causal_conv1d(x.float().cpu(), w.float().cpu(), s.float().cpu())
    y, s_new = torch.ops.nextq.causal_conv1d(x, w, s)
    assert rel(y, y_ref) <= TOL
    assert torch.equal(s_new.float().cpu(), s_ref)  # the carried state is a copy of inputs: exact
    # in place, as the decode step runs it: state_out is state
    from nextq.runtime.triton.conv_update import conv_into

    y2, st = torch.full_like(x, float("nan")), s.clone()
    conv_into(x, w, st, y2, st)
    assert rel(y2, y_ref) <= TOL and torch.equal(st.float().cpu(), s_ref)


def test_norm_kernels_match_reference():
    from nextq.runtime import model

    g = torch.Generator().manual_seed(5)
    x, h, z = (torch.randn(3, 7, 2048, generator=g).to(DEV, torch.bfloat16) for _ in range(3))
    w = (torch.randn(2048, generator=g) * 0.1).to(DEV)
    xs, hs, zs, ws = x.float().cpu(), h.float().cpu(), z.float().cpu(), w.cpu()
    assert rel(norms.rms_norm(x, w, 1.0, 1e-6), model.rms_norm(xs, ws, 1.0, 1e-6)) <= TOL
    s, y = norms.add_rms_norm(x, h, w, 1.0, 1e-6)
    assert rel(s, xs + hs) <= TOL and rel(y, model.rms_norm(xs + hs, ws, 1.0, 1e-6)) <= TOL
    assert rel(norms.gated_rms_norm(x, z, w, 1e-6), model.gated_rms_norm(xs, zs, ws, 1e-6)) <= TOL


@pytest.mark.parametrize("N,E,K,shared", [(1, 512, 10, True), (8, 64, 4, False), (4096, 512, 10, True)])
def test_route_kernel_matches_reference(N, E, K, shared):
    from nextq.runtime.triton.moe_grouped import route_into

    g = torch.Generator().manual_seed(N)
    logits = (torch.randn(N, E + 3, generator=g) * 2).to(DEV, torch.bfloat16)  # padded past the shared gate
    w, ids, sg = route_into(logits, E, K, True, shared=shared)
    # bf16 logits tie often (a tenth of the tokens at 4096 x 512): judge by probabilities, not ids. The chosen
    # experts' fp32 softmax probabilities are the top-k values, each id once, and the weights are them renormalised
    probs = torch.softmax(logits[:, :E].float().cpu(), -1)
    ids = ids.long().cpu()
    chosen = probs.gather(1, ids)
    assert all(len(set(r)) == K for r in ids.tolist())
    assert torch.allclose(chosen.sort(1, descending=True).values, probs.topk(K, -1).values, rtol=1e-6, atol=0)
    assert torch.allclose(w.cpu(), chosen / chosen.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)
    if shared:
        assert torch.allclose(sg.cpu(), torch.sigmoid(logits[:, E].float().cpu()), rtol=1e-6)
    else:
        assert sg is None


YARN_RECIPE = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=262144)  # the model card's


@pytest.mark.parametrize("scaling", [None, YARN_RECIPE], ids=["plain", "yarn"])
def test_qk_norm_rope_kernel_matches_reference(scaling):
    """q/k RMSNorm + partial split-half RoPE (plain, and YaRN with its attention factor) + cache write vs
    runtime/model.py at the real head shape."""
    from nextq.graph import ModelConfig, RopeScaling
    from nextq.runtime import model
    from nextq.runtime.rope import rope_parameters
    from nextq.runtime.triton.qk_rope import qk_norm_rope_into

    b, t, hq, hkv, d = 2, 5, 16, 2, 256
    c = ModelConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, layer_types=("full_attention",),
                    num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d, rope_theta=1e7,
                    rope_scaling=RopeScaling(**scaling) if scaling else None)
    inv_freq, factor = rope_parameters(c)
    g = torch.Generator().manual_seed(9)
    splits = [hq * d, hq * d, hkv * d, hkv * d]
    proj = torch.randn(b, t, sum(splits), generator=g).to(DEV, torch.bfloat16)
    wq, wk = (torch.randn(d, generator=g) * 0.1 for _ in range(2))
    positions = torch.tensor([3, 700, 9, 31000, 4], device=DEV)
    q, _, k, v = proj.float().cpu().split(splits, -1)
    pos = positions.cpu()
    q_ref = model.rope(model.rms_norm(q.reshape(b, t, hq, d), wq, 1.0, 1e-6).transpose(1, 2), pos, inv_freq, factor)
    k_ref = model.rope(model.rms_norm(k.reshape(b, t, hkv, d), wk, 1.0, 1e-6).transpose(1, 2), pos, inv_freq, factor)
    kc, vc = (torch.zeros(b, hkv, 32768, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    q_out = torch.full((b, hq, t, d), float("nan"), device=DEV, dtype=torch.bfloat16)
    qk_norm_rope_into(proj, (hq, hkv, d), (2 * hq * d, 2 * hq * d + hkv * d), positions,
                      (inv_freq.to(DEV), factor), wq.to(DEV), wk.to(DEV), (1.0, 1.0), 1e-6, q_out, kc, vc)
    assert rel(q_out, q_ref) <= TOL and rel(kc[:, :, positions], k_ref) <= TOL
    assert torch.equal(vc[:, :, positions].float().cpu(), v.reshape(b, t, hkv, d).transpose(1, 2))
    assert int(kc.count_nonzero()) == b * hkv * t * d  # nothing written outside the given positions


def moe_args(N, H, I, Is, E, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * s[-1] ** -0.5  # noqa: E731
    return dict(x=torch.randn(N, H, generator=g), router=r(E, H), gate=r(E, I, H), up=r(E, I, H), down=r(E, H, I),
                shared=(r(Is, H), r(Is, H), r(H, Is), r(1, H)))


def stack_quantized(w: torch.Tensor, scheme: str):
    qs = [quantize(w[e], scheme) for e in range(w.shape[0])]
    return torch.stack([q.data for q in qs]), torch.stack([q.scales.reshape(q.scales.shape[0], -1) for q in qs])


def routed_reference(x, w, ids, gate, up, down):
    """sum_j w[n, j] swiglu_e(x[n]) over e = ids[n, j], expert by expert (fp32, CPU)."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        n, j = (ids == e).nonzero(as_tuple=True)
        out.index_add_(0, n, w[n, j, None] * ops.swiglu(x[n], gate[e], up[e], down[e]))
    return out


def packed_experts(a, scheme):
    """(ExpertMatrix on the device, dequantized fp32 reference on the CPU) for gate, up, down."""
    from nextq.runtime.triton.moe_fp8 import float_experts
    from nextq.runtime.triton.moe_int4 import int4_experts

    make, deq = ((int4_experts, cuda_ops.dequantize_int4_experts) if scheme.startswith("int4")
                 else (float_experts, cuda_ops.dequantize_fp8_experts))
    out = []
    for w in (a["gate"], a["up"], a["down"]):
        q, s = stack_quantized(w, scheme)
        out.append((make(q.to(DEV), s.to(DEV)), deq(q, s)))
    return out


# N: GEMV path at batch 1 and 8 (real expert shapes, top-10), grouped-GEMM path (small and real shapes);
# with and without the shared expert (fused into the GEMV kernels, cuBLAS beside the grouped GEMM)
@pytest.mark.parametrize("scheme", ["int4_sym_g32", "int4_sym_g128", "fp8_channel", "fp8_block128"])
@pytest.mark.parametrize("N,H,I,Is,E,K", [(1, 256, 128, 64, 16, 4), (8, 2048, 512, 512, 64, 10),
                                          (300, 256, 128, 96, 16, 4), (600, 2048, 512, 512, 64, 10)])
@pytest.mark.parametrize("shared", [False, True])
def test_quantized_expert_kernels_match_reference(scheme, N, H, I, Is, E, K, shared):
    """The expert kernels on one fixed routing (computed once on the CPU) vs dequantize + per-expert swiglu."""
    from nextq.runtime.triton.moe_grouped import SharedExpert, experts_forward

    a = moe_args(N, H, I, Is, E, seed=N + E)
    x = a["x"].to(torch.bfloat16)
    w, ids = ops.route(x.float() @ a["router"].T, K, True)
    (g, gr), (u, ur), (d, dr) = packed_experts(a, scheme)
    ref = routed_reference(x.float(), w, ids, gr, ur, dr)
    kw = {}
    if shared:
        sgate, sup, sdown, sg_w = (t.to(torch.bfloat16) for t in a["shared"])
        gate_sig = torch.sigmoid(x.float() @ sg_w.float().T)[:, 0]
        ref += gate_sig[:, None] * ops.swiglu(x.float(), sgate.float(), sup.float(), sdown.float())
        kw = dict(shared=SharedExpert.from_dense(sgate.to(DEV), sup.to(DEV), sdown.to(DEV)),
                  shared_gate=gate_sig.to(DEV))
    out = torch.full((N, H), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned: every row must be written
    got = experts_forward(x.to(DEV), w.to(DEV), ids.to(DEV), g, u, d, out=out, **kw)
    assert got.dtype == torch.bfloat16
    assert rel(got, ref) <= TOL


@pytest.mark.parametrize("scheme", ["int4_sym_g32", "fp8_block128"])
def test_quantized_moe_ops_match_cpu_reference(scheme):
    """nextq::moe_int4 / moe_fp8 on CUDA vs their CPU references, routing included. Batch 8 at real shapes:
    the GPU routes on bf16 logits, the CPU on fp32; with 8 tokens a near-tie flip is rare (a flipped token
    would show as a few-percent error)."""
    a = moe_args(8, 2048, 512, 512, 64, seed=21)
    packed = [t for w in (a["gate"], a["up"], a["down"]) for t in stack_quantized(w, scheme)]
    op = torch.ops.nextq.moe_int4 if scheme.startswith("int4") else torch.ops.nextq.moe_fp8
    x = a["x"].to(torch.bfloat16)
    ref = op(x.float(), a["router"], *packed, *a["shared"], 10, True)  # CPU reference: dequantize + ops.moe, fp32
    dev = [x.to(DEV), a["router"].to(DEV, torch.bfloat16), *(t.to(DEV) for t in packed),
           *(t.to(DEV, torch.bfloat16) for t in a["shared"])]
    got = op(*dev, 10, True)
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    assert rel(got, ref) <= TOL


@pytest.mark.parametrize("N", [3, 500])
def test_float_moe_kernel_matches_reference(N):
    a = moe_args(N, 64, 32, 24, 7, seed=N)
    cpu = (a["x"], a["router"], a["gate"], a["up"], a["down"], *a["shared"], 2, False)
    ref = ops.moe_reference(*cpu) if N < 10 else ops.moe(*cpu)
    got = torch.ops.nextq.moe(*(t.to(DEV, torch.bfloat16) for t in cpu[:9]), 2, False)
    assert rel(got, ref) <= TOL


# ---- the executor ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graphs(ckpt_factory, tmp_path_factory):
    """Tiny IRs: `base` (MoE, float and int4 experts) and `odd` (non-power-of-two dims, a dense layer)."""
    from nextq.convert.cli import convert
    from nextq.graph import Graph

    out = {}
    for name, kw in (("base", {"moe_intermediate_size": 32}), ("odd", {})):
        ir = tmp_path_factory.mktemp(f"gpu-{name}") / "ir"
        convert(str(ckpt_factory(name, **kw)), ir)
        out[name] = Graph.load(ir)
    qdir = tmp_path_factory.mktemp("gpu-int4") / "ir"
    out["base"].save(qdir, cast=lambda n, t: quantize(t, "int4_sym_g32") if ".experts." in n else t)
    out["int4"] = Graph.load(qdir)
    return out


@pytest.mark.parametrize("name", ["base", "odd", "int4"])
def test_gpu_model_logits_match_cpu_runtime(graphs, name):
    from nextq.runtime.gpu import GpuModel
    from nextq.runtime.model import TorchModel

    ids = torch.randint(0, 96, (2, 131), generator=torch.Generator().manual_seed(3))
    ref = TorchModel(graphs[name]).forward(ids)  # CPU runtime, fp32 (int4: the same dequantized values)
    got32 = GpuModel.from_graph(graphs[name], dtype=torch.float32, max_batch=2).prefill(ids, all_logits=True)
    # fp32 on the GPU (3xTF32 products in the Triton kernels, fp32 elsewhere): summation order only -> 1e-3
    assert rel(got32, ref) <= 1e-3
    got = GpuModel.from_graph(graphs[name], max_batch=2).prefill(ids, all_logits=True).float().cpu()
    # bf16 through every layer: rounding compounds, and a near-tie in top-k routing can pick another expert for a
    # token (a large error on that token alone) -> judge the typical token: median per-position rel L2 <= 3e-2,
    # and the argmax must agree on >= 90% of positions
    per_pos = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float(per_pos.median()) <= 3e-2
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9


def test_gpu_decode_graphs_match_whole_sequence(graphs):
    """Prefill 3 tokens, then CUDA-graph decode steps (crossing an attention bucket): same logits as one pass."""
    from nextq.runtime import gpu
    from nextq.runtime.gpu import GpuModel

    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(4))
    m = GpuModel.from_graph(graphs["int4"], dtype=torch.float32, max_batch=2, max_seq=64)
    ref = m.prefill(ids, all_logits=True)
    old, gpu.ATTN_BUCKET = gpu.ATTN_BUCKET, 16  # small buckets: several graphs, each replayed
    try:
        steps = [m.prefill(ids[:, :3])]
        steps += [m.decode(ids[:, i:i + 1]).clone() for i in range(3, 40)]
    finally:
        gpu.ATTN_BUCKET = old
    assert len(m.graphs) == 3  # spans 16, 32, 48
    assert rel(torch.stack(steps, 1), ref[:, 2:]) <= 1e-3  # fp32: recurrent vs chunked (3xTF32) delta rule
    # greedy generation feeds its own argmax back inside the graph
    m.prefill(ids[:, :5])
    toks = m.generate_greedy(4, first=ids[:, 5:6])
    assert toks.shape == (2, 4) and toks.dtype == torch.long


def test_gpu_yarn_matches_cpu_runtime(graphs):
    """YaRN (original context 16, factor 4) at positions up to 8x the original: the GPU executor vs the CPU
    runtime (itself checked against transformers in tests/test_yarn.py), whole sequence and prefill + decode."""
    import dataclasses

    from nextq.graph import Graph, RopeScaling
    from nextq.runtime.gpu import GpuModel
    from nextq.runtime.model import TorchModel

    base = graphs["int4"]
    yarn = RopeScaling("yarn", 4.0, 16)
    g = Graph(dataclasses.replace(base.config, rope_scaling=yarn), base.tensors, base.provenance, base.assets)
    ids = torch.randint(0, 96, (2, 131), generator=torch.Generator().manual_seed(5))
    ref = TorchModel(g).forward(ids)
    plain = TorchModel(base).forward(ids)
    assert rel(plain, ref) > 1e-2  # YaRN changes the logits visibly past the original context
    m = GpuModel.from_graph(g, dtype=torch.float32, max_batch=2, max_seq=160)
    got32 = m.prefill(ids, all_logits=True)
    assert rel(got32, ref) <= 1e-3  # fp32 on the GPU: summation order and 3xTF32 only, as the test above
    steps = [m.prefill(ids[:, :100])] + [m.decode(ids[:, i:i + 1]).clone() for i in range(100, 131)]
    assert rel(torch.stack(steps, 1), ref[:, 99:]) <= 1e-3  # decode past 4x the original context
    got = GpuModel.from_graph(g, max_batch=2).prefill(ids, all_logits=True).float().cpu()
    per_pos = (got - ref).norm(dim=-1) / ref.norm(dim=-1)  # bf16: the bound of test_gpu_model_logits_match_cpu_runtime
    assert float(per_pos.median()) <= 3e-2


def test_gpu_runs_an_fp8_checkpoint(tmp_path):
    """An IR read from an FP8 checkpoint (tests/test_fp8_source.py's fixture: ragged 128x128 tiles, fp8_g128 where
    the tiles straddle q / k / v / z): fp8_block128 experts stay packed in the MoE kernels, other fp8 tensors are
    dequantized once at load (the GPU runtime's rule for non-expert quantized tensors); vs the CPU runtime."""
    from test_fp8_source import make_fp8_checkpoint

    from nextq.convert.cli import convert
    from nextq.graph import Graph
    from nextq.runtime.gpu import GpuModel
    from nextq.runtime.model import TorchModel

    fp8, _ = make_fp8_checkpoint(tmp_path)
    convert(str(fp8), tmp_path / "ir")
    g = Graph.load(tmp_path / "ir")
    assert g.get("layers.0.ffn.experts.0.gate.weight").scheme == "fp8_block128"
    ids = torch.randint(0, 96, (2, 67), generator=torch.Generator().manual_seed(6))
    ref = TorchModel(g).forward(ids)
    got32 = GpuModel.from_graph(g, dtype=torch.float32, max_batch=2).prefill(ids, all_logits=True)
    assert rel(got32, ref) <= 1e-3  # fp32: summation order and 3xTF32, as test_gpu_model_logits_match_cpu_runtime
    got = GpuModel.from_graph(g, max_batch=2).prefill(ids, all_logits=True).float().cpu()
    per_pos = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    # bf16: the fp32 check above is the exactness one; this random ragged model's bf16 drift measured 3.03e-2
    # median on the H200 (the float models of test_gpu_model_logits_match_cpu_runtime stay under 3e-2)
    assert float(per_pos.median()) <= 4e-2


# ---- speculative verify: T tokens in one launch, the state after each token in its own slot ------------------


@pytest.mark.parametrize("T", [1, 4])
def test_conv_kernel_steps_match_token_by_token(T):
    """conv_into(steps=True): the outputs of one launch over T tokens, and slot t = the state after token t, as T
    single-token reference steps; the kept state is not written."""
    from nextq.runtime.triton.conv_update import conv_into

    g = torch.Generator().manual_seed(50 + T)
    b, c, k = 2, 300, 4
    x = torch.randn(b, T + 2, c, generator=g)[:, 1:T + 1].to(DEV, torch.bfloat16)  # strided, as a projection slice
    w = torch.randn(c, k, generator=g).to(DEV, torch.bfloat16)
    s0 = torch.randn(b, c, k - 1, generator=g).to(DEV, torch.bfloat16)
    kept = s0.clone()
    y = torch.full_like(x, float("nan"))
    slots = torch.full((T + 1, b, c, k - 1), float("nan"), device=DEV, dtype=torch.bfloat16)  # one spare slot
    conv_into(x, w, s0, y, slots, steps=True)
    st = s0.float().cpu()
    for t in range(T):
        y_ref, st = ops.causal_conv1d(x[:, t:t + 1].float().cpu(), w.float().cpu(), st)
        assert rel(y[:, t:t + 1], y_ref) <= TOL
        assert torch.equal(slots[t].float().cpu(), st)  # copies of inputs: exact
    assert torch.equal(s0, kept) and bool(slots[T].isnan().all())


@pytest.mark.parametrize("T", [1, 4])
def test_recurrent_kernel_steps_match_token_by_token(T):
    """gdr_recurrent_into(steps=True) with raw gates: one launch over T tokens vs T reference steps; slot t holds
    the state after token t (fp32 both sides, rel 1e-4: approximate exp and rsqrt on the GPU); the kept state is
    untouched."""
    import torch.nn.functional as F

    q, k, v, _, _, s0 = on_gpu(gdr_inputs(2, T, 2, 4, 128, 128, seed=60 + T))
    g = torch.Generator().manual_seed(70 + T)
    a_raw, b_raw = torch.randn(2, T, 4, generator=g) * 4, torch.randn(2, T, 4, generator=g)
    a_log, dt_bias = torch.rand(4, generator=g) * 2, torch.randn(4, generator=g) * 0.5
    gl, beta = -a_log.exp() * F.softplus(a_raw + dt_bias), torch.sigmoid(b_raw)
    kept = s0.clone()
    out = torch.full_like(v, float("nan"))
    slots = torch.full((T + 1, *s0.shape), float("nan"), device=DEV)
    gdr_recurrent.gdr_recurrent_into(q, k, v, a_raw.to(DEV), b_raw.to(DEV), s0, out, slots,
                                     gates=(a_log.to(DEV), dt_bias.to(DEV)), steps=True)
    st = s0.cpu()
    for t in range(T):
        j = slice(t, t + 1)
        o_ref, st = ops.gated_delta_rule_recurrent(q[:, j].float().cpu(), k[:, j].float().cpu(),
                                                   v[:, j].float().cpu(), gl[:, j], beta[:, j], st)
        assert rel(out[:, j], o_ref) <= TOL and rel(slots[t], st) <= 1e-4
    assert torch.equal(s0, kept) and bool(slots[T].isnan().all())


# ---- int4 dequantization inside the expert kernels --------------------------------------------------------------


@triton.jit
def _tile_probe(wq, ws, out, K, se_q, sn_q, se_s, sn_s, sk_s, N, SBK: tl.constexpr, NS: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    """Writes moe_grouped._w_tile's fp32 tile of expert program_id(0), rows 0 .. BN, k tile program_id(1)."""
    e, i_k = tl.program_id(0), tl.program_id(1)
    rn = tl.arange(0, BN)
    w = _w_tile(wq, ws, e, rn, rn < N, i_k * BK, K, se_q, sn_q, se_s, sn_s, sk_s, 0, 1, SBK, NS, BN, BK)
    rk = i_k * BK + tl.arange(0, BK)
    tl.store(out + (e * N + rn[:, None]) * K + rk[None, :], w, mask=(rn < N)[:, None] & (rk < K)[None, :])


@pytest.mark.parametrize("scheme,bk", [("int4_sym_g32", 32), ("int4_sym_g32", 256), ("int4_sym_g128", 64),
                                       ("int4_sym_g128", 256)])
def test_int4_tile_dequantization_is_exact(scheme, bk):
    """The bit-trick int4 dequantization (f = 1 + q/16 from the nibble's bits, w = f 16d - 24d) gives exactly
    (q - 8) d, for tiles of one scale group, of several, and of part of one; rows past N (masked) are not read."""
    from nextq.runtime.triton.moe_int4 import int4_experts

    g = torch.Generator().manual_seed(bk)
    w = torch.randn(3, 24, 512, generator=g)
    q, s = stack_quantized(w, scheme)
    q[0, 0, :4] = torch.tensor([0x00, 0xFF, 0x8F, 0xF0], dtype=torch.uint8)  # every nibble extreme
    m = int4_experts(q.to(DEV), s.to(DEV))
    ref = cuda_ops.dequantize_int4_experts(q, s)
    out = torch.full((3, 24, 512), float("nan"), device=DEV)
    meta = m.meta(bk)
    _tile_probe[(3, 512 // bk)](m.data, m.scales, out, 512, *m.args()[2:], 24, SBK=meta["SBK"], NS=meta["NS"],
                                BN=32, BK=bk)
    assert torch.equal(out.cpu(), ref)


def attn_reference(q, kc, vc, positions, gate):
    """runtime/model.py's CPU attention in fp32 on the values the kernel saw: key j visible to token t iff
    j <= positions[t], GQA, scores scaled by D^-0.5, output times sigmoid(gate) in the [B, T, Hq * D] layout."""
    b, hq, t, d = q.shape
    s = max(positions) + 1
    qf, kf, vf, gf = (x.float().cpu() for x in (q, kc[:, :, :s], vc[:, :, :s], gate))
    mask = torch.arange(s)[None, :] <= torch.tensor(positions)[:, None]  # [T, S]
    o = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, enable_gqa=True, scale=d ** -0.5)
    return o.transpose(1, 2).reshape(b, t, hq * d) * torch.sigmoid(gf)


def attn_inputs(b, t, visible, span, dtype=torch.bfloat16, hq=16, hkv=2, d=256, seed=0):
    """Fresh random q / caches / gate at the real head shape (16 query heads on 2 KV heads of 256) for T tokens
    whose last sees `visible` cache rows (positions visible - T .. visible - 1, clipped at 0), caches of span + 64
    rows; cache rows past the last position hold NaN, which must not be read; out is poisoned with NaN."""
    g = torch.Generator().manual_seed(seed)
    positions = [max(0, visible - t + i) for i in range(t)]
    q = torch.randn(b, hq, t, d, generator=g).to(DEV, dtype)
    kc, vc = (torch.randn(b, hkv, span + 64, d, generator=g).to(DEV, dtype) for _ in range(2))
    for c in (kc, vc):
        c[:, :, max(positions) + 1:] = float("nan")
    gate = torch.randn(b, t, 3 * hq * d, generator=g).to(DEV, dtype)[..., hq * d:2 * hq * d]  # a view, as in gpu.py
    out = torch.full((b, t, hq * d), float("nan"), device=DEV, dtype=dtype)
    return q, kc, vc, positions, gate, out


ATTN_PROMPT = 512  # "prompt+k": the verify step after a 512-token prompt, T = k + 1 tokens


@pytest.mark.parametrize("kernel", ["split", "serial"])
@pytest.mark.parametrize("visible", [1, 31, 32, 33, 2047, 2048, "prompt+k"])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_attn_decode_kernel_matches_reference(kernel, visible, B, T):
    """Fused decode / verify attention (runtime/triton/attn_decode.py: the split-K kernel and version 5's serial
    one) vs the CPU attention over each token's visible rows. The kernel's span is the visible length itself, or
    the runtime's bucket (multiple of 256) for 1 and prompt+k."""
    from nextq.runtime.triton.attn_decode import attn_decode_into, attn_decode_serial_into

    vis = ATTN_PROMPT + T if visible == "prompt+k" else visible
    span = -(-vis // 256) * 256 if visible in (1, "prompt+k") else vis
    q, kc, vc, positions, gate, out = attn_inputs(B, T, vis, span, seed=vis * 37 + B * 5 + T)
    fn = attn_decode_into if kernel == "split" else attn_decode_serial_into
    fn(q, kc, vc, torch.tensor(positions, device=DEV), span, gate, out)
    assert rel(out, attn_reference(q, kc, vc, positions, gate)) <= TOL


@pytest.mark.parametrize("splits", [1, 3, 7, 1000])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, TOL), (torch.float32, 1e-5)])
def test_attn_decode_split_counts_and_fp32(splits, dtype, tol):
    """Any number of slices (rows per slice a multiple of the block) gives the same attention; fp32 caches take
    fp32 products (no tf32): the embedded model runs the GPU executor in fp32."""
    from nextq.runtime.triton.attn_decode import attn_decode_into

    q, kc, vc, positions, gate, out = attn_inputs(2, 4, 600, 768, dtype=dtype, seed=splits)
    attn_decode_into(q, kc, vc, torch.tensor(positions, device=DEV), 768, gate, out, splits=splits)
    assert rel(out, attn_reference(q, kc, vc, positions, gate)) <= tol
