"""Custom ops: fast implementations vs their plain references (outputs and states), awkward sizes."""

import pytest
import torch

from nextq.runtime import ops


def gdr_inputs(B, T, Hk, Hv, Dk, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, Hk, Dk, generator=g), torch.randn(B, T, Hk, Dk, generator=g),
            torch.randn(B, T, Hv, Dv, generator=g), -torch.rand(B, T, Hv, generator=g) * 3,
            torch.rand(B, T, Hv, generator=g), torch.randn(B, Hv, Dk, Dv, generator=g) * 0.1)


# T: decode, ragged, aligned, spilling; Hv = Hk, 2 Hk, 3 Hk; non-power-of-two head dims
@pytest.mark.parametrize("T", [1, 7, 64, 257])
@pytest.mark.parametrize("B,Hk,Hv,Dk,Dv", [(1, 2, 2, 16, 16), (2, 2, 4, 12, 20), (1, 1, 3, 5, 7)])
def test_chunked_delta_rule_matches_recurrent(T, B, Hk, Hv, Dk, Dv):
    args = gdr_inputs(B, T, Hk, Hv, Dk, Dv)
    o_ref, s_ref = ops.gated_delta_rule_recurrent(*args)
    o, s = ops.gated_delta_rule_chunked(*args)
    # fp32, different summation order; the state is a sum of up to T rank-1 terms -> 1e-5 absolute
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-4)


def test_delta_rule_op_dispatches_and_state_chains():
    """The registered op on a sequence split in two equals one pass (state carried across calls)."""
    q, k, v, g, b, s0 = gdr_inputs(2, 90, 2, 4, 8, 8, seed=3)
    o_all, s_all = torch.ops.nextq.gated_delta_rule(q, k, v, g, b, s0)
    o1, s1 = torch.ops.nextq.gated_delta_rule(q[:, :50], k[:, :50], v[:, :50], g[:, :50], b[:, :50], s0)
    o2, s2 = torch.ops.nextq.gated_delta_rule(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], b[:, 50:], s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_all, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s2, s_all, atol=1e-5, rtol=1e-4)


def test_delta_rule_known_answer_single_step():
    """One token from a zero state: S = beta k v^T, o = S^T q = beta (k.q) v with unit-normalised q/k."""
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[2.0, 0.0]]]])  # normalised to [1, 0]
    v = torch.tensor([[[[3.0, -1.0]]]])
    g = torch.zeros(1, 1, 1)
    beta = torch.full((1, 1, 1), 0.5)
    o, s = ops.gated_delta_rule_recurrent(q, k, v, g, beta, torch.zeros(1, 1, 2, 2))
    # q scaled by Dk^-0.5 = 1/sqrt(2); S = 0.5 * [1,0]^T [3,-1]
    torch.testing.assert_close(s[0, 0], torch.tensor([[1.5, -0.5], [0.0, 0.0]]))
    torch.testing.assert_close(o[0, 0, 0], torch.tensor([1.5, -0.5]) / 2 ** 0.5)


@pytest.mark.parametrize("T", [1, 2, 5])
def test_causal_conv_state_carry(T):
    """Conv over a sequence in pieces equals one pass over the whole (T < K-1 included)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 6, generator=g)
    w = torch.randn(6, 4, generator=g)
    zero = torch.zeros(2, 6, 3)
    y_all, s_all = torch.ops.nextq.causal_conv1d(x, w, zero)
    ys, s = [], zero
    for i in range(0, 12, T):
        y, s = torch.ops.nextq.causal_conv1d(x[:, i:i + T], w, s)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_all)
    torch.testing.assert_close(s, s_all)
    # known answer: first output = silu(w[:, -1] * x_0)
    torch.testing.assert_close(y_all[:, 0], torch.nn.functional.silu(w[:, -1] * x[:, 0]))


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, True), (4, True)])
def test_moe_dispatch_matches_reference(top_k, normalize):
    g = torch.Generator().manual_seed(top_k)
    N, H, I, Is, E = 13, 10, 6, 5, 7
    args = (torch.randn(N, H, generator=g), torch.randn(E, H, generator=g), torch.randn(E, I, H, generator=g),
            torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g), torch.randn(Is, H, generator=g),
            torch.randn(Is, H, generator=g), torch.randn(H, Is, generator=g), torch.randn(1, H, generator=g))
    ref = ops.moe_reference(*args, top_k, normalize)
    got = torch.ops.nextq.moe(*args, top_k, normalize)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_route_known_answer():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    w, ids = ops.route(logits, 2, True)
    p = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w[0], torch.stack([p[3], p[2]]) / (p[3] + p[2]))
