"""The fused head (``moe_gato.model.head``): the chunked linear + cross-entropy equals the
unfused head's weighted loss, per-position losses and gradients, for any chunk size, without
a host read; it refuses shapes that do not fit."""

from __future__ import annotations

import pytest
import torch

from moe_gato.model.head import fused_linear_cross_entropy, reference_linear_cross_entropy
from moe_gato.train.host_reads import HostReads


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_fused_equals_the_unfused_head(chunk):
    g = torch.Generator().manual_seed(0)
    N, D, V = 50, 16, 300
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    targets = torch.randint(V, (N,), generator=g)
    weight = torch.rand(N, generator=g) * (torch.rand(N, generator=g) > 0.3)
    results = []
    for fn in (reference_linear_cross_entropy, fused_linear_cross_entropy):
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        kw = {"chunk": chunk} if fn is fused_linear_cross_entropy else {}
        with HostReads() as reads:
            total, nll = fn(xi, wi, targets, weight, **kw)
            (total * 0.7).backward()
        results.append((total, nll, xi.grad, wi.grad, reads.count))
    (t0, n0, gx0, gw0, _), (t1, n1, gx1, gw1, reads) = results
    assert reads == 0
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-6)
    assert not n1.requires_grad


def test_fused_without_gradients_and_bad_shapes():
    x, w = torch.randn(5, 4), torch.randn(9, 4)
    t, wt = torch.randint(9, (5,)), torch.ones(5)
    with torch.no_grad():
        total, nll = fused_linear_cross_entropy(x, w, t, wt, chunk=2)
    torch.testing.assert_close(total, reference_linear_cross_entropy(x, w, t, wt)[0])
    with pytest.raises(ValueError,
                       match=r"x must be \(N, D\) and w \(V, D\), got \(5, 4\) and \(9, 3\)"):
        fused_linear_cross_entropy(x, torch.randn(9, 3), t, wt)
