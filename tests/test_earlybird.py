"""Tests for ebtrain.earlybird: masks, distances and the Early-Bird detector on hand-made gamma sequences."""
import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ebtrain.earlybird import (ChannelMask, EarlyBird, channel_scores, draw_mask, jaccard, mask_distance,
                               prunable_bns)


class TwoBN(nn.Module):
    """Two BN layers (4 and 6 channels, N = 10) whose gammas a test sets per 'epoch'."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(6)

    def set_gammas(self, gammas: list[float]) -> None:
        with torch.no_grad():
            self.bn1.weight.copy_(torch.tensor(gammas[:4]))
            self.bn2.weight.copy_(torch.tensor(gammas[4:]))


def keep_of(pattern: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in pattern])


def gammas_for(pattern: str) -> list[float]:
    """Gammas whose ratio-0.5 mask is `pattern` (five '1's, at least one per layer): kept ones large.

    Signs alternate to check that scores use |gamma|.
    """
    return [(1.0 if c == "1" else 0.1) * (-1) ** i for i, c in enumerate(pattern)]


def run_patterns(detector: EarlyBird, model: TwoBN, patterns: list[str]) -> dict[int, list[float]]:
    """Feed one ratio-0.5 mask pattern per epoch; return {epoch: ratios that emerged at it}."""
    emerged = {}
    for pattern in patterns:
        model.set_gammas(gammas_for(pattern))
        tickets = detector.step()
        assert torch.equal(detector.masks(0.5)[-1].keep, keep_of(pattern))
        if tickets:
            emerged[detector.epochs[-1]] = [t.ratio for t in tickets]
    return emerged


A = "1100111000"
FAR = "0011000111"  # differs from A everywhere: distance 1.0


# -- draw_mask ---------------------------------------------------------------------------------

def plain_ranking(flat: list[float]) -> list[int]:
    return sorted(range(len(flat)), key=lambda i: (flat[i], i))


def protected_indices(scores: list[torch.Tensor], min_keep: float = 0.0) -> set[int]:
    """Each layer's max(1, ceil(min_keep * size)) largest scores; among ties the highest indices."""
    out, start = set(), 0
    for s in scores:
        values = s.tolist()
        floor = max(1, math.ceil(round(min_keep * len(values), 9)))
        by_rank = sorted(range(len(values)), key=lambda i: (values[i], i), reverse=True)
        out.update(start + i for i in by_rank[:floor])
        start += len(values)
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(),
       sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6),
       ratio=st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
       tie_heavy=st.booleans(),
       min_keep=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9]))
def test_draw_mask_prunes_exactly_the_global_ranking(data, sizes, ratio, tie_heavy, min_keep):
    # Tie-heavy scores come from a handful of values so ties within and across layers are common.
    values = st.sampled_from([0.0, 0.25, 0.5]) if tie_heavy else st.floats(0.0, 10.0)
    scores = [torch.tensor(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32)
              for n in sizes]
    mask = draw_mask(scores, ratio, min_keep)
    n, k = sum(sizes), math.floor(ratio * sum(sizes) + 1e-9)
    flat = torch.cat(scores).tolist()
    protected = protected_indices(scores, min_keep)
    pruned = [i for i in range(n) if not mask.keep[i]]
    kept_free = [i for i in range(n) if mask.keep[i] and i not in protected]

    assert mask.sizes == tuple(sizes)
    assert mask.num_pruned == len(pruned) == min(k, n - len(protected))
    assert all(mask.keep[i] for i in protected)
    assert all(kept >= max(1, math.ceil(round(min_keep * size, 9)))
               for kept, size in zip(mask.kept_per_layer(), sizes))
    # Every pruned channel ranks below every unprotected kept one by (score, position).
    if pruned and kept_free:
        assert max((flat[i], i) for i in pruned) < min((flat[i], i) for i in kept_free)
    assert mask.kept_back == len(protected & set(plain_ranking(flat)[:k]))


@pytest.mark.parametrize("sizes", [(4, 6), (64, 64, 128, 128, 256), (1, 1, 3), (7,)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.01, 0.99])
def test_draw_mask_exact_count_with_all_equal_scores(sizes, ratio):
    # At initialization every gamma is 0.5; the reference's quantile threshold would prune all of them.
    scores = [torch.full((n,), 0.5) for n in sizes]
    mask = draw_mask(scores, ratio)
    n = sum(sizes)
    assert mask.num_pruned == min(math.floor(ratio * n + 1e-9), n - len(sizes))
    # The last channel of every layer is protected; the rest are pruned in position order.
    lasts = [sum(sizes[:i + 1]) - 1 for i in range(len(sizes))]
    free_order = [i for i in range(n) if i not in lasts]
    assert [i for i in range(n) if not mask.keep[i]] == free_order[:mask.num_pruned]


def test_draw_mask_all_equal_hand_example():
    mask = draw_mask([torch.full((4,), 0.5), torch.full((6,), 0.5)], 0.5)
    assert mask.keep.tolist() == [False, False, False, True, False, False, True, True, True, True]
    assert mask.kept_back == 1  # the plain first five would empty the first layer
    assert mask.kept_per_layer() == [1, 4]
    assert [t.tolist() for t in mask.per_layer()] == [[False, False, False, True],
                                                       [False, False, True, True, True, True]]


def test_draw_mask_ties_break_by_layer_then_channel():
    scores = [torch.tensor([0.1, 0.2, 0.2, 0.3]), torch.tensor([0.2, 0.2, 0.5])]
    assert draw_mask(scores, 0.5).keep.tolist() == [False, False, False, True, True, True, True]
    # The fourth pruned channel is the first 0.2 of the second layer, not the later one.
    assert draw_mask(scores, 0.6).keep.tolist() == [False, False, False, True, False, True, True]


def test_draw_mask_protects_highest_index_max_and_counts_shortfall():
    scores = [torch.tensor([0.5, 0.1, 0.5]), torch.tensor([0.9, 0.9, 0.9])]
    mask = draw_mask(scores, 0.99)  # floor(5.94) = 5 > N - layers = 4
    assert mask.keep.tolist() == [False, False, True, False, False, True]
    assert mask.num_pruned == 4
    assert mask.kept_back == 1  # plain ranking 1, 0, 2, 3, 4 would empty the first layer: one short


def test_layer_with_all_smallest_gammas_keeps_its_largest():
    scores = [torch.tensor([0.02, 0.01, 0.03]), torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])]
    mask = draw_mask(scores, 1 / 3)
    assert mask.num_pruned == 3
    assert mask.per_layer()[0].tolist() == [False, False, True]
    assert mask.per_layer()[1].tolist() == [False, True, True, True, True, True]
    assert mask.kept_back == 1
    assert mask.kept_per_layer() == [1, 5]


def test_min_keep_moves_the_pruning_of_a_starved_layer_to_the_others():
    # The plain ranking at 0.5 would empty the first layer; the default floor keeps its largest channel.
    scores = [torch.tensor([0.01, 0.02, 0.03, 0.04]), torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])]
    assert draw_mask(scores, 0.5).kept_per_layer() == [1, 4]
    mask = draw_mask(scores, 0.5, min_keep=0.5)
    assert mask.num_pruned == 5
    assert mask.per_layer()[0].tolist() == [False, False, True, True]
    assert mask.per_layer()[1].tolist() == [False, False, False, True, True, True]
    assert mask.kept_back == 2  # channels 2 and 3 of the first layer, which the plain ranking prunes


def test_min_keep_floor_is_exact_for_fractions_that_floats_round_up():
    # 0.14 * 50 is 7.000000000000001 in floating point: the floor is 7 channels, not 8.
    scores = [torch.linspace(0.01, 0.3, 50), torch.linspace(1.0, 2.0, 50)]
    mask = draw_mask(scores, 0.9, min_keep=0.14)
    assert mask.kept_per_layer() == [7, 7]
    assert mask.num_pruned == 86


@pytest.mark.parametrize("ratio, n, pruned", [(0.7, 90, 63),   # 0.7 * 90 is 62.99999999999999
                                              (0.58, 50, 29),  # 28.999999999999996
                                              (0.57, 100, 57), (0.29, 100, 29),
                                              (0.3, 10, 3), (0.1, 30, 3),  # exact products stay exact
                                              (0.07, 100, 7), (0.5, 7, 3), (0.9, 90, 81)])
def test_draw_mask_prunes_the_count_a_float_product_stands_for(ratio, n, pruned):
    scores = [torch.linspace(0.01, 1.0, n // 2), torch.linspace(0.02, 2.0, n - n // 2)]
    assert draw_mask(scores, ratio).num_pruned == pruned


@pytest.mark.parametrize("min_keep", [-0.1, 1.0, float("nan")])
def test_draw_mask_rejects_min_keep_outside_its_range(min_keep):
    with pytest.raises(ValueError, match="min_keep"):
        draw_mask([torch.ones(4)], 0.5, min_keep)


def test_detector_draws_with_its_min_keep_and_saves_it():
    model = TwoBN()
    model.set_gammas([0.01, 0.02, 0.03, 0.04, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    detector = EarlyBird(model, ratios=[0.5], min_keep=0.5)
    detector.step()
    assert detector.masks(0.5)[-1].kept_per_layer() == [2, 3]
    assert detector.summary()["min_keep"] == 0.5
    state = detector.state_dict()
    with pytest.raises(ValueError, match="min_keep"):
        EarlyBird(model, ratios=[0.5]).load_state_dict(state)
    resumed = EarlyBird(model, ratios=[0.5], min_keep=0.5)
    resumed.load_state_dict(state)
    assert resumed.masks(0.5) == detector.masks(0.5)
    # a state saved before the floor existed was drawn with the floor of one channel
    del state["min_keep"]
    EarlyBird(model, ratios=[0.5]).load_state_dict(state)


def test_draw_mask_is_deterministic_and_leaves_scores_alone():
    torch.manual_seed(0)
    scores = [torch.rand(16).round(decimals=1), torch.rand(32).round(decimals=1)]
    before = [s.clone() for s in scores]
    first = draw_mask(scores, 0.5)
    assert first == draw_mask(scores, 0.5)
    assert first == draw_mask([s.double() for s in scores], 0.5)
    assert all(torch.equal(a, b) for a, b in zip(scores, before))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_draw_mask_rejects_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match="ratio"):
        draw_mask([torch.ones(4)], ratio)


def test_draw_mask_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="NaN"):
        draw_mask([torch.tensor([1.0, float("nan")])], 0.5)


# -- scores ------------------------------------------------------------------------------------

def test_channel_scores_are_detached_float32_cpu_abs_gamma():
    model = TwoBN()
    model.set_gammas([-1.0, 2.0, -3.0, 4.0, 5.0, -6.0, 7.0, 8.0, 9.0, -10.0])
    scores = channel_scores(model)
    assert [s.tolist() for s in scores] == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]]
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" and not s.requires_grad for s in scores)


def test_prunable_bns_prefers_the_models_own_list():
    class OnlySecond(TwoBN):
        def prunable_bns(self):
            return [("bn2", self.bn2)]

    assert [name for name, _ in prunable_bns(TwoBN())] == ["bn1", "bn2"]
    assert [name for name, _ in prunable_bns(OnlySecond())] == ["bn2"]
    assert [s.numel() for s in channel_scores(OnlySecond())] == [6]


def test_channel_scores_rejects_model_without_bn():
    with pytest.raises(ValueError, match="no prunable"):
        channel_scores(nn.Linear(2, 2))


# -- mask_distance -----------------------------------------------------------------------------

bool_vectors = st.lists(st.booleans(), min_size=12, max_size=12).map(torch.tensor)


@given(a=bool_vectors, b=bool_vectors, c=bool_vectors)
def test_mask_distance_is_a_metric(a, b, c):
    assert mask_distance(a, b) == mask_distance(b, a)
    assert (mask_distance(a, b) == 0.0) == torch.equal(a, b)
    assert mask_distance(a, c) <= mask_distance(a, b) + mask_distance(b, c) + 1e-12
    assert 0.0 <= mask_distance(a, b) <= 1.0


layer_sizes = st.lists(st.integers(1, 10), min_size=1, max_size=5)


@st.composite
def drawn_masks(draw, count: int):
    """`count` masks drawn by draw_mask from random scores of one network (random layer sizes)."""
    sizes = draw(layer_sizes)
    masks = []
    for _ in range(count):
        scores = [torch.tensor(draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))) for n in sizes]
        masks.append(draw_mask(scores, draw(st.floats(0.01, 0.99))))
    return masks


@settings(max_examples=100, deadline=None)
@given(masks=drawn_masks(3))
def test_mask_distance_of_drawn_masks_is_a_metric_counting_differing_channels(masks):
    a, b, c = masks
    n = len(a.keep)
    assert mask_distance(a, b) == mask_distance(b, a) == int((a.keep != b.keep).sum()) / n
    assert (mask_distance(a, b) == 0.0) == torch.equal(a.keep, b.keep)
    assert mask_distance(a, a) == 0.0
    assert mask_distance(a, c) <= mask_distance(a, b) + mask_distance(b, c) + 1e-12


@settings(max_examples=100, deadline=None)
@given(data=st.data(), sizes=layer_sizes, low=st.floats(0.01, 0.99), high=st.floats(0.01, 0.99))
def test_masks_of_one_ranking_are_nested_and_their_distance_is_the_count_difference(data, sizes, low, high):
    low, high = min(low, high), max(low, high)
    scores = [torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))) for n in sizes]
    small, large = draw_mask(scores, low), draw_mask(scores, high)
    n = sum(sizes)
    assert small.num_pruned == min(math.floor(low * n), n - len(sizes))
    assert large.num_pruned == min(math.floor(high * n), n - len(sizes))
    assert bool((~small.keep <= ~large.keep).all())  # what the smaller ratio prunes, the larger one prunes too
    assert mask_distance(small, large) == (large.num_pruned - small.num_pruned) / n


@settings(max_examples=100, deadline=None)
@given(data=st.data(), sizes=layer_sizes, ratio=st.floats(0.01, 0.99))
def test_draw_mask_depends_only_on_the_order_of_the_scores(data, sizes, ratio):
    # ties included: values from a small set; an increasing map keeps order and ties, so the mask stays
    scores = [torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 2.0]), min_size=n, max_size=n)))
              for n in sizes]
    assert draw_mask(scores, ratio) == draw_mask([3 * s.exp() + 1 for s in scores], ratio)


def test_mask_distance_hand_example_and_mixed_inputs():
    a = ChannelMask(keep_of("1100"), sizes=(2, 2))
    assert mask_distance(a, keep_of("1010")) == 0.5
    assert mask_distance(keep_of("1100111000"), keep_of("1100110001")) == 0.2


def test_mask_distance_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="shape"):
        mask_distance(keep_of("110"), keep_of("1100"))
    with pytest.raises(ValueError, match="sizes"):
        mask_distance(ChannelMask(keep_of("1100"), (2, 2)), ChannelMask(keep_of("1100"), (1, 3)))
    with pytest.raises(ValueError, match="bool"):
        mask_distance(torch.ones(4), keep_of("1100"))


def test_jaccard_on_constructed_masks():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert jaccard(a, b) == pytest.approx(1 / 3) and jaccard(a, a) == 1.0 and jaccard(a, ~a) == 0.0
    assert jaccard(torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool)) == 1.0
    drawn = draw_mask([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 5.0])], 0.4)
    assert jaccard(drawn, drawn.keep) == 1.0 and jaccard(drawn, a[:1].repeat(5)) == pytest.approx(3 / 5)


# -- detector ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, expected_epoch", [("paper", 9), ("reference", 8)])
def test_emerges_at_expected_epoch(rule, expected_epoch):
    # Masks change at epochs 0-3 (alternating with the far mask), then stay at A from epoch 4 on.
    # Paper: the queue must hold five zero distances, d(4,5) .. d(8,9) -> epoch 9.
    # Reference: the window 4..8 must be all A -> epoch 8.
    model = TwoBN()
    detector = EarlyBird(model, ratios=[0.5], eps=0.1, queue_length=5, rule=rule)
    emerged = run_patterns(detector, model, [A, FAR, A, FAR] + [A] * 8)
    assert emerged == {expected_epoch: [0.5]}
    ticket = detector.emerged[0.5]
    assert (ticket.ratio, ticket.epoch) == (0.5, expected_epoch)
    assert torch.equal(ticket.mask.keep, keep_of(A))
    assert ticket.distances == [0.0] * (5 if rule == "paper" else 4)
    assert detector.done and detector.pending == []
    assert len(detector.masks(0.5)) == 12  # recording goes on after emergence


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_never_emerges_while_masks_keep_changing(rule):
    model = TwoBN()
    detector = EarlyBird(model, ratios=[0.5], eps=0.1, queue_length=3, rule=rule)
    assert run_patterns(detector, model, [A, FAR] * 10) == {}
    assert not detector.done and detector.pending == [0.5] and detector.emerged == {}
    assert detector.summary()["ratios"]["0.5"]["eb_epoch"] is None


# Each step swaps one kept and one pruned channel (consecutive distance 0.2), drifting away from the
# start: d(DRIFT[0], DRIFT[i]) = 0.2 * i.
DRIFT = ["1100111000", "1010111000", "0011111000", "0011110100", "0011100110"]


def test_paper_rule_accepts_slow_drift_that_reference_rejects():
    model = TwoBN()
    paper = EarlyBird(model, ratios=[0.5], eps=0.25, queue_length=4, rule="paper")
    reference = EarlyBird(model, ratios=[0.5], eps=0.25, queue_length=4, rule="reference")
    for pattern in DRIFT:
        model.set_gammas(gammas_for(pattern))
        paper_tickets, reference_tickets = paper.step(), reference.step()
    assert [t.epoch for t in paper_tickets] == [4]
    assert paper.queue(0.5) == pytest.approx([0.2] * 4)
    assert reference_tickets == [] and reference.pending == [0.5]
    assert reference.queue(0.5) == pytest.approx([0.6, 0.4, 0.2])


def test_reference_rule_accepts_newest_close_to_all_that_paper_rejects():
    # Older masks alternate (distance 0.4 apart); the newest lies 0.2 from both.
    b, c = "1001110100", "1100110100"
    assert mask_distance(keep_of(A), keep_of(b)) == 0.4
    assert mask_distance(keep_of(c), keep_of(A)) == mask_distance(keep_of(c), keep_of(b)) == 0.2
    model = TwoBN()
    paper = EarlyBird(model, ratios=[0.5], eps=0.25, queue_length=4, rule="paper")
    reference = EarlyBird(model, ratios=[0.5], eps=0.25, queue_length=4, rule="reference")
    for pattern in [b, A, b, c]:
        model.set_gammas(gammas_for(pattern))
        paper_tickets, reference_tickets = paper.step(), reference.step()
    assert [t.epoch for t in reference_tickets] == [3]
    assert reference_tickets[0].distances == pytest.approx([0.2, 0.2, 0.2])
    assert paper_tickets == [] and paper.pending == [0.5]


def test_distance_equal_to_eps_does_not_emerge():
    model = TwoBN()
    detector = EarlyBird(model, ratios=[0.5], eps=0.2, queue_length=4, rule="paper")
    run_patterns(detector, model, DRIFT)
    assert detector.pending == [0.5]


def several_ratio_gammas() -> list[list[float]]:
    """Per epoch: the three smallest channels (1, 2, 5) never change, so the 0.3 mask is fixed from
    epoch 0; the top three (kept at 0.7) rotate through epochs 0-3 and settle at epoch 4."""
    tops = [(0, 4, 6), (3, 7, 8), (0, 8, 9), (3, 4, 9)] + [(0, 6, 7)] * 8
    epochs = []
    for top in tops:
        middle = [i for i in (0, 3, 4, 6, 7, 8, 9) if i not in top]
        g = [0.0] * 10
        for i, value in zip((1, 2, 5), (0.01, 0.02, 0.03)):
            g[i] = value
        for i, value in zip(middle, (0.2, 0.3, 0.4, 0.5)):
            g[i] = value
        for i, value in zip(top, (0.8, 0.9, 1.0)):
            g[i] = value
        epochs.append(g)
    return epochs


def test_several_ratios_emerge_at_different_epochs():
    model = TwoBN()
    detector = EarlyBird(model, ratios=(0.3, 0.7), eps=0.1, queue_length=5)
    emerged = {}
    for gammas in several_ratio_gammas():
        model.set_gammas(gammas)
        for ticket in detector.step():
            emerged[ticket.ratio] = ticket.epoch
        if detector.epochs[-1] == 6:
            assert detector.pending == [0.7] and not detector.done
    assert emerged == {0.3: 5, 0.7: 9}
    # The 0.7 mask really did change every epoch until epoch 4.
    sevens = detector.masks(0.7)
    assert all(mask_distance(sevens[e - 1], sevens[e]) > 0 for e in range(1, 5))
    assert detector.done and detector.pending == []


def test_state_round_trip_mid_sequence_gives_identical_decisions():
    sequence = several_ratio_gammas()
    model = TwoBN()
    for cut in (3, 6):  # before any emergence, and after 0.3 emerged but before 0.7
        # `first` runs uninterrupted; `resumed` restarts from its state saved at `cut`.
        first = EarlyBird(model, ratios=(0.3, 0.7), eps=0.1, queue_length=5)
        for gammas in sequence[:cut]:
            model.set_gammas(gammas)
            first.step()
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = EarlyBird(model, ratios=(0.3, 0.7), eps=0.1, queue_length=5)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert resumed.summary() == first.summary()
        for gammas in sequence[cut:]:
            model.set_gammas(gammas)
            got, want = resumed.step(), first.step()
            assert [(t.ratio, t.epoch, t.distances) for t in got] == \
                   [(t.ratio, t.epoch, t.distances) for t in want]
        assert {r: t.epoch for r, t in resumed.emerged.items()} == {0.3: 5, 0.7: 9}
        assert resumed.epochs == first.epochs == list(range(len(sequence)))
        assert resumed.summary() == first.summary()
        for r in (0.3, 0.7):
            assert resumed.queue(r) == first.queue(r)
            assert resumed.masks(r) == first.masks(r)
            assert torch.equal(resumed.distance_matrix(r), first.distance_matrix(r))


def test_load_state_rejects_different_settings():
    model = TwoBN()
    saved = EarlyBird(model, ratios=(0.5,), eps=0.1)
    saved.step()
    with pytest.raises(ValueError, match="eps"):
        EarlyBird(model, ratios=(0.5,), eps=0.2).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="rule"):
        EarlyBird(model, ratios=(0.5,), eps=0.1, rule="reference").load_state_dict(saved.state_dict())


def test_distance_matrix_is_symmetric_zero_diagonal_and_matches_mask_distance():
    model = TwoBN()
    detector = EarlyBird(model, ratios=[0.5], queue_length=3)
    run_patterns(detector, model, DRIFT + [A, FAR])
    matrix = detector.distance_matrix(0.5)
    masks = detector.masks(0.5)
    assert matrix.shape == (7, 7)
    assert torch.equal(matrix, matrix.T)
    assert torch.equal(matrix.diagonal(), torch.zeros(7, dtype=matrix.dtype))
    for i in range(7):
        for j in range(7):
            assert matrix[i, j].item() == mask_distance(masks[i], masks[j])
    assert matrix[0, 6].item() == 1.0 and matrix[0, 4].item() == pytest.approx(0.8)


def test_epoch_labels_default_and_explicit():
    model = TwoBN()
    detector = EarlyBird(model, ratios=[0.5])
    detector.step()
    detector.step()
    detector.step(5)
    detector.step()
    assert detector.epochs == [0, 1, 5, 6]
    with pytest.raises(ValueError, match="epoch"):
        detector.step(6)


def test_queries_before_and_after_steps_and_summary_is_json():
    model = TwoBN()
    detector = EarlyBird(model, ratios=[0.5], queue_length=3)
    assert detector.last_distance(0.5) is None and detector.queue(0.5) == []
    assert detector.distance_matrix(0.5).shape == (0, 0)
    run_patterns(detector, model, [A, FAR, A])
    assert detector.last_distance(0.5) == 1.0
    assert detector.queue(0.5) == [1.0, 1.0]
    summary = json.loads(json.dumps(detector.summary()))
    assert summary["ratios"]["0.5"] == {"name": "p50", "eb_epoch": None, "last_distance": 1.0, "queue_max": 1.0,
                                        "kept_back": 0, "channels_fraction": 0.5, "flops_fraction": None}
    with pytest.raises(ValueError, match="not tracked"):
        detector.queue(0.3)


@pytest.mark.parametrize("kwargs, match", [
    ({"ratios": [0.3, 1.0]}, "ratio 1.0"),
    ({"ratios": []}, "empty"),
    ({"ratios": [0.5, 0.5]}, "duplicates"),
    ({"eps": 0.0}, "eps 0.0"),
    ({"eps": 1.5}, "eps 1.5"),
    ({"queue_length": 1}, "queue_length 1"),
    ({"queue_length": 2.5}, "queue_length 2.5"),
    ({"rule": "mine"}, "paper, reference"),
    ({"min_keep": 1.0}, "min_keep 1.0"),
])
def test_constructor_validates_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyBird(TwoBN(), **kwargs)
