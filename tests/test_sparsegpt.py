"""Checks for epts_export.sparsegpt whose answers are known exactly or by a clear margin."""

from __future__ import annotations

import pytest
import torch

from epts_export.core.sparsegpt import sparsegpt_prune
from epts_export.core.stats import HessianAccumulator


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """X (n, d): Gaussian tokens mixed by a random matrix, so features are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g)
    A = torch.randn(d, d, generator=g) / d**0.5 + 0.3 * torch.randn(1, d, generator=g)
    return Z @ A


def _hessian(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[1])
    acc.add_batch(X)
    return acc.H


def _magnitude_rowwise(W: torch.Tensor, frac: float) -> torch.Tensor:
    """Zero the int(in*frac) smallest |w| of each row."""
    k = int(W.shape[1] * frac)
    idx = torch.topk(W.abs(), k, dim=1, largest=False).indices
    return W.scatter(1, idx, 0.0)


def _magnitude_nm(W: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| of every m consecutive input columns."""
    G = W.reshape(W.shape[0], -1, m)
    idx = torch.topk(G.abs(), m - n, dim=2, largest=False).indices
    return G.scatter(2, idx, 0.0).reshape(W.shape)


def _recon_err(X: torch.Tensor, W: torch.Tensor, Wp: torch.Tensor) -> float:
    return torch.linalg.norm(X @ W.t() - X @ Wp.t()).item()


# (1) sparsity patterns


def test_unstructured_exact_fraction_per_block():
    X = _correlated_inputs(512, 256, seed=0)
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    Wp = sparsegpt_prune(W, _hessian(X), sparsity=0.5, blocksize=128)
    zeros = Wp == 0
    for i1 in range(0, 256, 128):
        assert zeros[:, i1 : i1 + 128].sum().item() == 48 * 128 // 2
    assert zeros.float().mean().item() == 0.5


def test_sparsity_zero_prunes_nothing_and_matches_weight():
    X = _correlated_inputs(512, 128, seed=2)
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    Wp = sparsegpt_prune(W, _hessian(X), sparsity=0.0)
    assert (Wp == 0).sum().item() == 0
    torch.testing.assert_close(Wp, W)


def test_2_4_pattern_valid():
    X = _correlated_inputs(512, 256, seed=4)
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(5))
    Wp = sparsegpt_prune(W, _hessian(X), nm=(2, 4), sparsity=0.9)  # sparsity ignored
    groups = (Wp == 0).reshape(32, -1, 4).sum(dim=2)  # (out, in/4) zeros per group
    assert (groups >= 2).all()
    assert (Wp == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


# (2) identity Hessian: no error propagation, so SparseGPT is magnitude pruning per block


def test_identity_hessian_is_blockwise_magnitude_pruning():
    out, cols, bs = 16, 256, 64
    g = torch.Generator().manual_seed(6)
    # distinct magnitudes (small integers, exactly representable squares) so there are no ties
    mags = (torch.randperm(out * cols, generator=g) + 1).float().reshape(out, cols)
    signs = torch.where(torch.rand(out, cols, generator=g) < 0.5, -1.0, 1.0)
    W = mags * signs
    for c in (1.0, 3.0):
        Wp = sparsegpt_prune(W, c * torch.eye(cols), sparsity=0.5, blocksize=bs)
        expected = W.clone()
        for i1 in range(0, cols, bs):
            blk = expected[:, i1 : i1 + bs]  # view
            k = blk.numel() // 2
            idx = torch.topk(blk.abs().flatten(), k, largest=False).indices
            flat = blk.flatten()
            flat[idx] = 0
            expected[:, i1 : i1 + bs] = flat.reshape(blk.shape)
        assert torch.equal(Wp, expected)


def test_identity_hessian_2_4_is_magnitude_2_4():
    g = torch.Generator().manual_seed(7)
    W = (torch.randperm(8 * 64, generator=g) + 1).float().reshape(8, 64)
    Wp = sparsegpt_prune(W, torch.eye(64), nm=(2, 4), blocksize=32)
    assert torch.equal(Wp, _magnitude_nm(W, 2, 4))


# (3) SparseGPT beats magnitude pruning on layer reconstruction error


def test_beats_magnitude_unstructured_50():
    X = _correlated_inputs(1024, 256, seed=8)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(9))
    Wp = sparsegpt_prune(W, _hessian(X), sparsity=0.5)
    err_sgpt = _recon_err(X, W, Wp)
    err_mag = _recon_err(X, W, _magnitude_rowwise(W, 0.5))
    assert err_sgpt < 0.5 * err_mag


def test_beats_magnitude_2_4():
    X = _correlated_inputs(1024, 256, seed=10)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(11))
    Wp = sparsegpt_prune(W, _hessian(X), nm=(2, 4))
    err_sgpt = _recon_err(X, W, Wp)
    err_mag = _recon_err(X, W, _magnitude_nm(W, 2, 4))
    assert err_sgpt < 0.5 * err_mag


# (4) Hessian accumulation


def test_hessian_batches_equal_concatenation_and_closed_form():
    X = _correlated_inputs(300, 32, seed=12)
    a, b = X[:100].reshape(4, 25, 32), X[100:]  # leading dims of any shape
    two = HessianAccumulator(32)
    two.add_batch(a)
    two.add_batch(b)
    one = HessianAccumulator(32)
    one.add_batch(X)
    assert two.nsamples == one.nsamples == 300
    torch.testing.assert_close(two.H, one.H, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.H, 2 / 300 * X.t() @ X, rtol=1e-5, atol=1e-5)
    assert one.H.dtype == torch.float32 and one.H.shape == (32, 32)


def test_hessian_rejects_wrong_width():
    with pytest.raises(ValueError):
        HessianAccumulator(8).add_batch(torch.randn(3, 9))


# (5) no in-place modification, dtype preserved, dead columns, bad Hessian


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_untouched_and_dtype_preserved(dtype):
    X = _correlated_inputs(256, 64, seed=13)
    H = _hessian(X)
    H_before = H.clone()
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(14)).to(dtype)
    W_before = W.clone()
    for kw in ({"sparsity": 0.5}, {"nm": (2, 4)}):
        Wp = sparsegpt_prune(W, H, blocksize=32, **kw)
        assert Wp.dtype == dtype and Wp.shape == W.shape
        assert (Wp == 0).float().mean().item() >= 0.5
    assert torch.equal(W, W_before)
    assert torch.equal(H, H_before)


def test_dead_columns_are_zeroed():
    X = _correlated_inputs(256, 64, seed=15)
    X[:, [3, 40]] = 0
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(16))
    Wp = sparsegpt_prune(W, _hessian(X), sparsity=0.25, blocksize=32)
    assert (Wp[:, [3, 40]] == 0).all()
    assert torch.isfinite(Wp).all()


def test_non_pd_hessian_raises_value_error():
    H = torch.eye(8)
    H[0, 0] = -5.0  # negative curvature: not positive definite even after damping
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(torch.randn(4, 8), H, sparsity=0.5)


def test_bad_nm_raises():
    with pytest.raises(ValueError):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), nm=(2, 3), blocksize=8)
