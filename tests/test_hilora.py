import torch

from epts_export.core.hilora import init_lora, merged_weight


def test_merged_weight_keeps_exactly_the_mask_zeros():
    torch.manual_seed(0)
    W = torch.randn(8, 12)
    B, A = torch.randn(8, 3 * 2), torch.randn(3 * 2, 12)
    mask = torch.rand(8, 12) > 0.6
    out = merged_weight(W, mask, B, A, [0, 1, 2], rank=2, scale=0.5)
    assert torch.equal(out == 0, ~mask)  # zeros exactly where the mask says (delta never leaks)
    assert torch.allclose(out[mask], (W + 0.5 * B @ A)[mask])


def test_hierarchy_group_k_uses_groups_0_to_k_only():
    torch.manual_seed(0)
    W = torch.randn(6, 8)
    mask = torch.ones(6, 8, dtype=torch.bool)
    B, A = torch.randn(6, 4 * 2), torch.randn(4 * 2, 8)
    ref = W + B[:, :4] @ A[:4]  # groups 0 and 1 (rank 2 each)
    assert torch.allclose(merged_weight(W, mask, B, A, [0, 1], 2, 1.0), ref)
    B2 = B.clone()
    B2[:, 4:] += 100  # groups 2, 3 must not matter at level k = 1
    assert torch.allclose(merged_weight(W, mask, B2, A, [0, 1], 2, 1.0), ref)
    # an N:M level: prefix plus its own, non-adjacent group
    ref_nm = W + B[:, :2] @ A[:2] + B[:, 6:] @ A[6:]
    assert torch.allclose(merged_weight(W, mask, B, A, [0, 3], 2, 1.0), ref_nm, atol=1e-6)
    assert torch.equal(merged_weight(W, mask, B, A, [], 2, 1.0), W)


def test_init_lora_starts_at_zero_delta():
    g = torch.Generator().manual_seed(0)
    B, A = init_lora(5, 7, groups=3, rank=2, generator=g)
    assert B.shape == (5, 6) and A.shape == (6, 7)
    assert not B.any() and A.abs().max() <= 1 / 7 ** 0.5


def test_merge_is_differentiable_in_adapters_only_through_kept_weights():
    W = torch.randn(4, 4)
    mask = torch.eye(4, dtype=torch.bool)
    B = torch.zeros(4, 2, requires_grad=True)
    A = torch.randn(2, 4, requires_grad=True)
    merged_weight(W, mask, B, A, [0], 2, 1.0).sum().backward()
    # d/dB[i,k] sum_ij mask_ij (B A)_ij = sum_j mask_ij A[k,j] = A[k,i] for the identity mask
    assert torch.allclose(B.grad, A.detach().T)


def test_float_mask_multiplies_to_the_same_values_as_the_bool_mask():
    """Training passes float 0/1 masks (a multiplication, fast on CPU), materialization bool ones
    (torch.where, exact +0.0): the same values and the same gradients."""
    import torch

    from epts_export.core.hilora import merged_weight

    torch.manual_seed(0)
    w = torch.randn(6, 8)
    mask = torch.rand(6, 8) > 0.5
    B = torch.randn(6, 4, requires_grad=True)
    A = torch.randn(4, 8, requires_grad=True)
    exact = merged_weight(w, mask, B, A, [0, 1], 2, 0.5)
    fast = merged_weight(w, mask.float(), B, A, [0, 1], 2, 0.5)
    assert torch.equal(exact, fast) and not torch.signbit(exact[~mask]).any()
    g1 = torch.autograd.grad(exact.square().sum(), [B, A])
    g2 = torch.autograd.grad(fast.square().sum(), [B, A])
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))
