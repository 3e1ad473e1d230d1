import math
from pathlib import Path

import numpy as np
import pytest

from mind.evaluate import evaluate_ranked, evaluate_retriever, plot_metric_vs_n, rank_cases
from mind.metrics import hit_matrix, per_user_metrics, recall_hr_ndcg


def d(r: int) -> float:
    """Discount of 0-based rank r."""
    return 1.0 / math.log2(r + 2)


def test_hand_computed_single_user():
    # targets {5, 7, 9}; hits at ranks 1 (7) and 3 (9)
    ranked = np.array([[4, 7, 6, 9, 11]])
    m = per_user_metrics(ranked, [np.array([5, 7, 9])], ns=(1, 2, 5))
    assert m["recall@1"][0] == 0.0
    assert m["hr@1"][0] == 0.0
    assert m["ndcg@1"][0] == 0.0
    assert m["recall@2"][0] == pytest.approx(1 / 3)
    assert m["hr@2"][0] == 1.0
    # IDCG@2 = d(0) + d(1) (min(|T|=3, N=2) = 2 ideal hits)
    assert m["ndcg@2"][0] == pytest.approx(d(1) / (d(0) + d(1)))
    assert m["recall@5"][0] == pytest.approx(2 / 3)
    assert m["ndcg@5"][0] == pytest.approx((d(1) + d(3)) / (d(0) + d(1) + d(2)))


def test_exact_numbers_and_average():
    ranked = np.array(
        [
            [3, 2, 8, -1],  # targets {2}: hit at rank 1
            [10, 11, 12, 13],  # targets {10, 13}: hits at 0 and 3
            [-1, -1, -1, -1],  # no list at all
        ]
    )
    targets = [np.array([2]), np.array([13, 10]), np.array([4])]
    m = recall_hr_ndcg(ranked, targets, ns=(2, 4))
    # ndcg@2 user0 = (1/log2 3) / 1 = 0.6309297535714575; user1 = 1 / (1 + 1/log2 3) = 0.6131471927654584
    assert m["ndcg@2"] == pytest.approx((0.6309297535714575 + 0.6131471927654584) / 3)
    assert m["recall@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["hr@2"] == pytest.approx(2 / 3)
    # ndcg@4 user1 = (1 + 1/log2 5) / (1 + 1/log2 3) = 1.4306765580733931 / 1.6309297535714575
    assert m["ndcg@4"] == pytest.approx((0.6309297535714575 + 1.4306765580733931 / 1.6309297535714575) / 3)
    assert m["recall@4"] == pytest.approx(2 / 3)
    assert list(m) == [
        "recall@2",
        "recall@4",
        "hr@2",
        "hr@4",
        "ndcg@2",
        "ndcg@4",
        "ndcg_comirec@2",
        "ndcg_comirec@4",
    ]


def test_recall_is_at_most_hr_hand_computed():
    """recall <= hr holds per user: recall is a share of the targets found, hr whether any was found."""
    ranked = np.array([[5, 1, 2], [9, 8, 7], [3, 4, 6]])
    targets = [np.array([1, 2, 3, 4]), np.array([6]), np.array([3, 4])]
    m = per_user_metrics(ranked, targets, ns=(1, 3))
    # user 0: 2 of 4 targets in the top 3 -> recall 0.5, hr 1; none at rank 0 -> both 0 at N = 1
    # user 1: nothing found -> 0 and 0; user 2: both targets by N = 3 -> recall 1 = hr 1
    assert m["recall@3"].tolist() == [0.5, 0.0, 1.0] and m["hr@3"].tolist() == [1.0, 0.0, 1.0]
    assert m["recall@1"].tolist() == [0.0, 0.0, 0.5] and m["hr@1"].tolist() == [0.0, 0.0, 1.0]
    means = recall_hr_ndcg(ranked, targets, ns=(1, 3))
    assert (means["recall@3"], means["hr@3"]) == pytest.approx((0.5, 2 / 3))
    assert (means["recall@1"], means["hr@1"]) == pytest.approx((0.5 / 3, 1 / 3))


def test_comirec_ndcg_discounts_by_position_in_the_target_list():
    # targets (chronological) 10, 11, 12; the list finds 12 (rank 0) and 11 (rank 4)
    ranked = np.array([[12, 1, 2, 3, 11]])
    targets = [np.array([10, 11, 12])]
    m = per_user_metrics(ranked, targets, ns=(5,))
    # ComiRec: target positions 1 and 2 -> (d(1) + d(2)) / (d(0) + d(1)); the rank in the list is ignored
    assert m["ndcg_comirec@5"][0] == pytest.approx((d(1) + d(2)) / (d(0) + d(1)))
    # standard NDCG: hits at ranks 0 and 4 over the ideal 3 hits
    assert m["ndcg@5"][0] == pytest.approx((d(0) + d(4)) / (d(0) + d(1) + d(2)))
    # finding the first target alone gives ComiRec's NDCG its maximum, 1.0, at any rank
    assert per_user_metrics(np.array([[1, 2, 10]]), targets, ns=(3,))["ndcg_comirec@3"][0] == 1.0


def test_targets_are_a_set_and_repeated_list_items_count_once():
    ranked = np.array([[7, 7, 9]])
    m = per_user_metrics(ranked, [np.array([7, 7, 9])], ns=(3,))
    # |T| = 2 as a set; hits at ranks 0 and 2 (the repeated 7 at rank 1 does not count)
    assert m["recall@3"][0] == pytest.approx(1.0)
    assert m["ndcg@3"][0] == pytest.approx((d(0) + d(2)) / (d(0) + d(1)))
    assert hit_matrix(ranked, [np.array([7, 9])]).tolist() == [[True, False, True]]


def test_n_larger_than_list_and_perfect_list():
    ranked = np.array([[1, 2], [5, 6]])
    m = per_user_metrics(ranked, [np.array([1, 2]), np.array([9])], ns=(10,))
    assert m["recall@10"].tolist() == [1.0, 0.0]
    assert m["ndcg@10"][0] == pytest.approx(1.0)


def test_empty_batch():
    m = recall_hr_ndcg(np.zeros((0, 5), dtype=np.int64), [], ns=(5,))
    assert m == {"recall@5": 0.0, "hr@5": 0.0, "ndcg@5": 0.0, "ndcg_comirec@5": 0.0}


class _Case:
    def __init__(self, user: int, history, targets):
        self.user, self.history, self.targets = user, np.asarray(history), np.asarray(targets)


def test_evaluate_retriever_batches_and_pads(tmp_path: Path):
    cases = [_Case(u, [2, 3], [u + 2]) for u in range(7)]

    def recommend(batch, n):
        # recommends the user's own target first, returns a short list to test padding
        return np.array([[c.targets[0], 99] for c in batch])

    ranked = rank_cases(recommend, cases, n=5, batch_size=3)
    assert ranked.shape == (7, 5)
    assert (ranked[:, 2:] == -1).all()
    res = evaluate_retriever(recommend, cases, ns=(1, 5), batch_size=3)
    assert res["recall@1"] == 1.0 and res["ndcg@5"] == 1.0
    assert evaluate_ranked(ranked, cases, ns=(1,))["hr@1"] == 1.0

    out = plot_metric_vs_n(
        {"a": res, "b": {"recall@1": 0.2, "recall@5": 0.4, "hr@5": 0.9}}, tmp_path / "sub" / "r.png"
    )
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
