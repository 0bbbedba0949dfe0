"""Unit tests of runs and page maps (rmemfs/pagemap.py), against a page-by-page model."""
from __future__ import annotations

from hypothesis import given, strategies as st

from rmemfs.pagemap import PageMaps, Run, set_runs, unset_runs

maps = st.binary(max_size=64).map(lambda b: bytearray(x & 1 for x in b))
bounds = st.tuples(st.integers(0, 80), st.integers(0, 80))


def model_runs(flags: list[bool], first: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i, on in enumerate(flags, first):
        if not on:
            continue
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


@given(maps, bounds)
def test_set_runs_are_the_marked_pages_within_the_map(m: bytearray, span: tuple[int, int]) -> None:
    first, end = span
    assert list(set_runs(m, first, end)) == model_runs([i < len(m) and m[i] == 1 for i in range(first, end)], first)


@given(maps, bounds)
def test_unset_runs_count_pages_beyond_the_map_as_unset(m: bytearray, span: tuple[int, int]) -> None:
    first, end = span
    assert list(unset_runs(m, first, end)) == model_runs([i >= len(m) or m[i] == 0 for i in range(first, end)], first)


@given(st.lists(st.tuples(st.integers(2, 3), st.integers(0, 40), st.integers(1, 30)), max_size=12))
def test_claim_returns_each_page_once_and_runs_lists_them(runs: list[Run]) -> None:
    pages = PageMaps()
    claimed: list[tuple[int, int]] = []
    for region_id, first, n in runs:
        got = pages.claim(region_id, first, n, 48)
        assert all(n > 0 for _, _, n in got)
        claimed += [(rid, p) for rid, a, k in got for p in range(a, a + k)]
        assert pages.all_marked(region_id, first, min(n, 48 - first))
    wanted = {(rid, p) for rid, first, n in runs for p in range(first, min(first + n, 48))}
    assert len(claimed) == len(set(claimed)) and set(claimed) == wanted     # once each, none beyond the region
    assert {(rid, p) for rid, a, k in pages.runs() for p in range(a, a + k)} == wanted
    assert all(len(m) == 48 for m in pages.values())


def test_mark_and_all_marked() -> None:
    pages = PageMaps()
    assert not pages.all_marked(2, 0, 1)          # an absent region marks nothing
    pages.mark(2, 3, 4, 10)
    assert pages[2] == bytearray(b"\0\0\0\1\1\1\1\0\0\0")
    assert pages.all_marked(2, 3, 4) and not pages.all_marked(2, 2, 2) and not pages.all_marked(2, 8, 3)
    copy = pages.copy()
    copy.mark(2, 0, 1, 10)
    assert pages[2][0] == 0 and pages.runs() == [(2, 3, 4)] and copy.runs() == [(2, 0, 1), (2, 3, 4)]
