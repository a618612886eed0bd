import pytest

from epts_export.errors import UserError
from epts_export.core.levels import Level, build_groups, parse_level, parse_levels
from epts_export.core.rule import active_groups


def test_parse_levels_sorts_and_names():
    levels = parse_levels("2:4, 0.7,0.3,50%,0.3")
    assert [lv.name for lv in levels] == ["0.3", "0.5", "0.7", "2:4"]
    assert parse_level("2:4") == Level(sparsity=0.5, n=2, m=4)
    assert parse_level("1:4").sparsity == 0.75


@pytest.mark.parametrize("bad", ["0.95", "abc", "3:2", "2:2", "0:4", "-0.1", "nan", "a:b", ""])
def test_malformed_levels_are_user_errors(bad):
    with pytest.raises(UserError):
        parse_levels(bad)


def test_reference_groups_for_top_level_0_7():
    groups = build_groups(parse_levels("0.3,0.4,0.5,0.6,0.7,2:4"))
    assert [(g.lo, g.hi) for g in groups if not g.is_nm] == [
        (0.0, 0.4), (0.4, 0.45), (0.45, 0.5), (0.5, 0.55), (0.55, 0.6), (0.6, 0.65), (0.65, 0.7)]
    nm = [g for g in groups if g.is_nm]
    assert len(nm) == 1 and (nm[0].n, nm[0].m, nm[0].index) == (2, 4, 7)


def test_group_width_sets_the_rungs_above_group_0():
    groups = build_groups(parse_levels("0.3,0.7,2:4"), width=0.1)
    assert [(g.lo, g.hi) for g in groups if not g.is_nm] == [(0.0, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7)]
    assert groups[-1].is_nm and groups[-1].index == 4
    assert [g.hi for g in build_groups(parse_levels("0.65"), width=0.1)] == [0.4, 0.5, 0.6, 0.65]  # ends where asked
    for bad in (0, -0.1, 1.5):
        with pytest.raises(UserError, match="group width"):
            build_groups(parse_levels("0.7"), width=bad)


def test_off_grid_top_level_ends_the_range_exactly():
    groups = build_groups(parse_levels("0.62"))
    assert groups[-1].hi == 0.62 and groups[-2].hi == 0.6


def test_active_groups_hierarchy_prefix():
    groups = build_groups(parse_levels("0.3,0.7,2:4"))
    assert active_groups(groups, parse_level("0.2")) == [0]
    assert active_groups(groups, parse_level("0.4")) == [0]  # group 0 is (0, 0.4]
    assert active_groups(groups, parse_level("0.41")) == [0, 1]
    assert active_groups(groups, parse_level("0.7")) == [0, 1, 2, 3, 4, 5, 6]
    # 2:4 inherits the unstructured groups up to its density (0.5: group 2) and adds its own
    assert active_groups(groups, parse_level("2:4")) == [0, 1, 2, 7]


def test_levels_outside_the_trained_range_are_refused():
    groups = build_groups(parse_levels("0.3,0.6"))
    with pytest.raises(UserError, match="above the trained range"):
        active_groups(groups, parse_level("0.65"))
    with pytest.raises(UserError, match="not trained"):
        active_groups(groups, parse_level("2:4"))
