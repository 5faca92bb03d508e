"""Token-merging kernels against the tomesd package, and their own identities (pure torch)."""

import pytest
import tomesd.merge
import torch

from patchlab.kernels import token_merging as tm

GRIDS = [(8, 8, 2, 2, 20), (9, 13, 2, 2, 30), (16, 12, 3, 2, 50), (7, 5, 2, 2, 10), (6, 10, 2, 3, 25)]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def canonical_rows(x):
    """Rows in an order independent of how they were listed."""
    key = x[0] @ rand(x.shape[-1], seed=99)
    return x[:, key.argsort()]


@pytest.mark.parametrize("h,w,sx,sy,r", GRIDS)
def test_merge_selects_and_averages_the_same_tokens_as_tomesd(h, w, sx, sy, r):
    x = rand(1, h * w, 16, seed=h * w)
    theirs_merge, theirs_unmerge = tomesd.merge.bipartite_soft_matching_random2d(x, w, h, sx, sy, r, no_rand=True)
    ours_merge, ours_unmerge = tm.bipartite_soft_matching(x, h, w, sx, sy, r)
    theirs, ours = theirs_merge(x), ours_merge(x)
    kept = h * w - (h // sy) * (w // sx) - min(r, h * w - (h // sy) * (w // sx))
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[:, :kept], theirs[:, :kept])  # unmerged sources, by similarity
    # destinations: tomesd lists them in the order of a non-stable sort, so compare as a set of rows
    torch.testing.assert_close(canonical_rows(ours[:, kept:]), canonical_rows(theirs[:, kept:]))
    torch.testing.assert_close(ours_unmerge(ours), theirs_unmerge(theirs))


def test_unmerge_restores_unmerged_tokens_exactly_and_spreads_merged_means():
    x = rand(2, 64, 8)
    merge, unmerge = tm.bipartite_soft_matching(x, 8, 8, 2, 2, 20)
    restored = unmerge(merge(x))
    unchanged = (restored == x).all(dim=-1)
    assert int(unchanged.sum(dim=1).min()) >= 64 - 16 - 20
    merged = merge(x)
    assert merged.shape == (2, 44, 8)


def test_nothing_to_merge_is_the_identity():
    x = rand(1, 12, 4)
    for args in ((3, 4, 2, 2, 0), (1, 12, 2, 2, 5), (12, 1, 2, 2, 5)):
        merge, unmerge = tm.bipartite_soft_matching(x, *args)
        assert merge(x) is x and unmerge(x) is x


def test_merge_count_is_capped_at_the_number_of_sources():
    x = rand(1, 16, 4)
    merge, _ = tm.bipartite_soft_matching(x, 4, 4, 2, 2, 100)
    assert merge(x).shape[1] == 4


def test_destinations_take_one_token_per_complete_cell():
    src, dst = tm.destinations(5, 7, 2, 2)
    assert dst.tolist() == [0, 2, 4, 14, 16, 18]
    assert sorted(src.tolist() + dst.tolist()) == list(range(35))


def test_chosen_destinations_follow_the_choice_inside_each_cell():
    choice = torch.tensor([[3, 1]])
    _, dst = tm.destinations(2, 4, 2, 2, choice)
    assert dst.tolist() == [3, 5]  # cell 0 picks (1, 1) = token 5, cell 1 picks (0, 3) = token 3


def test_random_layouts_come_only_from_the_given_generator():
    state = torch.random.get_rng_state()
    first = tm.random_choices(torch.Generator().manual_seed(3), 4, 5, 6, 2, 2)
    again = tm.random_choices(torch.Generator().manual_seed(3), 4, 5, 6, 2, 2)
    assert torch.equal(first, again) and int(first.max()) < 4
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("method", tm.DOWNSAMPLE_METHODS)
def test_downsampling_shrinks_any_grid(method):
    x = rand(2, 13 * 22, 8)
    out = tm.downsample_tokens(x, (13, 22), 2.0, method)
    assert out.shape == (2, 7 * 11, 8) and torch.isfinite(out).all()


def test_downsampling_by_one_is_the_identity_and_nearest_picks_tokens():
    x = rand(1, 16, 4)
    assert tm.downsample_tokens(x, (4, 4), 1.0) is x
    picked = tm.downsample_tokens(x, (4, 4), 2.0, "nearest-exact")
    torch.testing.assert_close(picked, x.view(1, 4, 4, 4)[:, 1::2, 1::2].reshape(1, 4, 4))  # cell centres


def test_unknown_downsampling_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown downsampling method 'cubic'"):
        tm.downsample_tokens(rand(1, 16, 4), (4, 4), 2.0, "cubic")


def test_each_batch_item_merges_and_unmerges_as_it_would_alone():
    x = torch.randn(3, 6 * 10, 8, generator=torch.Generator().manual_seed(4))
    merge, unmerge = tm.bipartite_soft_matching(x, 6, 10, 2, 2, 25)
    merged, restored = merge(x), unmerge(merge(x))
    for i in range(3):
        alone_merge, alone_unmerge = tm.bipartite_soft_matching(x[i:i + 1], 6, 10, 2, 2, 25)
        torch.testing.assert_close(merged[i:i + 1], alone_merge(x[i:i + 1]))
        torch.testing.assert_close(restored[i:i + 1], alone_unmerge(alone_merge(x[i:i + 1])))


def test_sum_mode_adds_the_moved_tokens_into_their_destination():
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(5))
    merge, _ = tm.bipartite_soft_matching(x, 4, 4, 2, 2, 6)
    ones = torch.ones(1, 16, 1)
    assert float(merge(ones, mode="sum").sum()) == 16.0
    torch.testing.assert_close(merge(ones, mode="mean"), torch.ones(1, 10, 1))


def test_an_unknown_merge_mode_is_a_clear_error():
    x = torch.randn(1, 16, 4)
    merge, _ = tm.bipartite_soft_matching(x, 4, 4, 2, 2, 6)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        merge(x, mode="amax")
