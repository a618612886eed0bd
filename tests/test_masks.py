import torch

from epts_export.core.levels import parse_level
from epts_export.core.masks import (is_nm_sparse, keep_count, level_mask, magnitude_mask, nm_mask, importance_order,
                               unstructured_mask, wanda_scores)


def test_wanda_scores_by_hand():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    act = torch.tensor([4.0, 1.0])  # sqrt -> [2, 1]
    assert torch.equal(wanda_scores(W, act), torch.tensor([[2.0, 2.0], [6.0, 0.5]]))


def test_importance_order_by_hand_with_stable_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9]])
    # descending: col1 (0.9), col3 (0.9, tie -> later column second), col2, col0
    assert importance_order(scores).tolist() == [[3, 0, 2, 1]]
    assert importance_order(scores).dtype == torch.int16


def test_unstructured_mask_by_hand():
    order = torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3]], dtype=torch.int16)
    assert unstructured_mask(order, 0.5).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert unstructured_mask(order, 0.0).all()
    assert keep_count(4, 0.25) == 3 and keep_count(10, 0.35) == 7  # round half up: 6.5 -> 7


def test_masks_are_nested_and_exact():
    torch.manual_seed(0)
    order = importance_order(torch.rand(16, 96))
    prev = None
    for s in [0.0, 0.1, 0.3, 0.45, 0.5, 0.63, 0.7, 0.9]:
        m = unstructured_mask(order, s)
        assert (m.sum(1) == keep_count(96, s)).all()  # every row keeps exactly its share
        if prev is not None:
            assert not (m & ~prev).any()  # M(s2) subset of M(s1) for s2 > s1
        prev = m


def test_nm_mask_by_hand_and_validity():
    order = torch.tensor([[3, 0, 2, 1, 0, 1, 2, 3]], dtype=torch.int16)
    assert nm_mask(order, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    torch.manual_seed(1)
    W = torch.randn(32, 64)
    m = level_mask(importance_order(W.abs()), parse_level("2:4"))
    assert is_nm_sparse(W * m, 2, 4)
    assert m.view(32, 16, 4).sum(-1).eq(2).all()  # exactly 2 of every 4, along the input axis


def test_magnitude_mask_is_layer_wide():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert magnitude_mask(W, parse_level("0.5")).tolist() == [[False, False], [True, True]]
