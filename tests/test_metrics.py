"""Unit tests for ``pipeline.metrics``: hand-computed cases, agreement with sklearn and
with brute-force re-implementations, closed forms, invariances and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline import metrics as M
from pipeline.metrics import failure_metrics, paired_bootstrap, seed_paired_bootstrap

FAST = settings(max_examples=60, deadline=None, database=None)

# ---------------------------------------------------------------------------------------
# Hand-computed case A: five samples, no ties.
#   conf    = 0.9  0.8  0.7  0.6  0.5   (already sorted, most confident first)
#   correct =  1    0    1    1    0
# accuracy = 3/5 = 0.6
# Cumulative errors among the k most confident: 0, 1, 1, 1, 2
# selective risk(k) = errors/k: 0, 1/2, 1/3, 1/4, 2/5
# AURC = (1/5) (0 + 1/2 + 1/3 + 1/4 + 2/5) = (1/5)(89/60) = 89/300 ~ 0.29667
# oracle (3 correct first, then the 2 errors): risk 0,0,0,1/4,2/5 -> (1/4 + 2/5)/5 = 0.13
# E-AURC = 89/300 - 39/300 = 50/300 = 1/6
# AUROC (correct = positive): pairs (pos, neg) with pos > neg:
#   0.9>0.8 y, 0.9>0.5 y, 0.7>0.8 n, 0.7>0.5 y, 0.6>0.8 n, 0.6>0.5 y -> 4/6 = 2/3
# AUPR-Success (AP, correct positive, by conf desc): hits at ranks 1, 3, 4 with precision
#   1, 2/3, 3/4, each recall step 1/3 -> (1 + 2/3 + 3/4)/3 = 29/36
# AUPR-Error (AP, wrong positive, by conf asc): 0.5 (wrong, P=1), 0.6, 0.7, 0.8 (wrong,
#   P=2/4) -> (1 + 1/2)/2 = 3/4
# FPR@95TPR: TPR >= 0.95 needs all 3 correct accepted -> threshold 0.6; wrong samples with
#   conf >= 0.6: only 0.8 -> FPR = 1/2
# AUGRC: generalised risk (errors/N) at coverage 0, .2, .4, .6, .8, 1: 0, 0, .2, .2, .2, .4
#   trapezoid: 0 + .2*(0+.2)/2 + .2*.2 + .2*.2 + .2*(.2+.4)/2 = .02+.04+.04+.06 = 0.16
#   closed form check: (1 - 2/3)*0.6*0.4 + 0.4^2/2 = 0.08 + 0.08 = 0.16
# Authors' convention: accept conf > t for each distinct t; t = 0.9 accepts nothing and
#   the full-coverage point never appears. Points (coverage, risk):
#   t=.8: (.2, 0), t=.7: (.4, 1/2), t=.6: (.6, 1/3), t=.5: (.8, 1/4)
#   trapezoid: .2*(0+1/2)/2 + .2*(1/2+1/3)/2 + .2*(1/3+1/4)/2 = .05 + 1/12 + 7/120 = 23/120
#   E-AURC (authors): 23/120 - (r + (1-r) ln(1-r)), r = 0.4 -> 23/120 - 0.4 - 0.6 ln 0.6
# ---------------------------------------------------------------------------------------
CONF_A = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
CORRECT_A = np.array([1, 0, 1, 1, 0])
EXPECTED_A = {
    "accuracy": 0.6,
    "auroc": 2 / 3,
    "aupr_success": 29 / 36,
    "aupr_error": 0.75,
    "fpr_at_95tpr": 0.5,
    "aurc": 89 / 300,
    "eaurc": 1 / 6,
    "augrc": 0.16,
    "aurc_authors": 23 / 120,
    "eaurc_authors": 23 / 120 - 0.4 - 0.6 * math.log(0.6),
}

# ---------------------------------------------------------------------------------------
# Hand-computed case B: six samples with ties (tied scores enter together).
#   conf    = 0.9 0.9 | 0.7 0.7 0.7 | 0.2
#   correct =  1   0  |  1   1   0  |  0
# accuracy = 1/2
# Risk-coverage points (one per distinct score):
#   0.9: accepted 2, errors 1 -> coverage 1/3, risk 1/2, generalised risk 1/6
#   0.7: accepted 5, errors 2 -> coverage 5/6, risk 2/5, generalised risk 1/3
#   0.2: accepted 6, errors 3 -> coverage 1,   risk 1/2, generalised risk 1/2
# AURC = 1/3*1/2 + (5/6-1/3)*2/5 + (1-5/6)*1/2 = 1/6 + 1/5 + 1/12 = 27/60 = 0.45
#   (if ties did NOT enter together, in input order, the risks would be
#    0, 1/2, 1/3, 1/4, 2/5, 1/2 and AURC = 0.3306: the test tells the two apart)
# oracle: 3 correct first -> risks at k=4,5,6: 1/4, 2/5, 1/2 -> (1.15)/6 = 23/120
# E-AURC = 54/120 - 23/120 = 31/120
# AUGRC trapezoid from (0,0): (1/3)(0+1/6)/2 + (1/2)(1/6+1/3)/2 + (1/6)(1/3+1/2)/2
#   = 1/36 + 1/8 + 5/72 = (2 + 9 + 5)/72 = 16/72 = 2/9
# AUROC with ties counted 1/2: pos 0.9 vs neg (0.9, 0.7, 0.2): .5+1+1 = 2.5;
#   each pos 0.7 vs neg: 0+.5+1 = 1.5 (twice) -> 5.5/9 = 11/18
#   closed form: (1 - 11/18)*1/4 + 1/8 = 7/72 + 9/72 = 16/72  (holds with ties too)
# FPR@95TPR: all 3 correct accepted at threshold 0.7; wrong with conf >= 0.7: 0.9, 0.7
#   -> 2/3
# Authors' AURC: points (1/3, 1/2) and (5/6, 2/5), full coverage dropped:
#   (5/6 - 1/3) * (1/2 + 2/5) / 2 = 0.225
# ---------------------------------------------------------------------------------------
CONF_B = np.array([0.9, 0.9, 0.7, 0.7, 0.7, 0.2])
CORRECT_B = np.array([1, 0, 1, 1, 0, 0])


def _nan_equal(a: float, b: float, rel: float = 1e-9) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=rel, abs=1e-12)


# ----------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize("name", M.METRIC_NAMES)
def test_failure_metrics_hand_case_a(name: str) -> None:
    result = M.failure_metrics(CONF_A, CORRECT_A)
    assert set(result) == set(M.METRIC_NAMES)
    assert result[name] == pytest.approx(EXPECTED_A[name], abs=1e-12)


def test_individual_functions_match_failure_metrics_case_a() -> None:
    assert M.aurc(CONF_A, CORRECT_A) == pytest.approx(89 / 300, abs=1e-12)
    assert M.oracle_aurc(CORRECT_A) == pytest.approx(0.13, abs=1e-12)
    assert M.eaurc(CONF_A, CORRECT_A) == pytest.approx(1 / 6, abs=1e-12)
    assert M.augrc(CONF_A, CORRECT_A) == pytest.approx(0.16, abs=1e-12)
    assert M.fpr_at_95tpr(CONF_A, CORRECT_A) == pytest.approx(0.5, abs=1e-12)
    assert M.aupr_error(CONF_A, CORRECT_A) == pytest.approx(0.75, abs=1e-12)


def test_risk_coverage_curve_case_a_no_ties() -> None:
    curve = M.risk_coverage_curve(CONF_A, CORRECT_A)
    np.testing.assert_allclose(curve.coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(curve.risk, [0, 1 / 2, 1 / 3, 1 / 4, 2 / 5])
    np.testing.assert_allclose(curve.generalised_risk, [0, 0.2, 0.2, 0.2, 0.4])
    np.testing.assert_allclose(curve.threshold, [0.9, 0.8, 0.7, 0.6, 0.5])


def test_risk_coverage_curve_ties_enter_together() -> None:
    curve = M.risk_coverage_curve(CONF_B, CORRECT_B)
    np.testing.assert_allclose(curve.coverage, [1 / 3, 5 / 6, 1.0])
    np.testing.assert_allclose(curve.risk, [1 / 2, 2 / 5, 1 / 2])
    np.testing.assert_allclose(curve.generalised_risk, [1 / 6, 1 / 3, 1 / 2])
    np.testing.assert_allclose(curve.threshold, [0.9, 0.7, 0.2])


def test_tied_metrics_case_b() -> None:
    assert M.aurc(CONF_B, CORRECT_B) == pytest.approx(0.45, abs=1e-12)
    assert M.oracle_aurc(CORRECT_B) == pytest.approx(23 / 120, abs=1e-12)
    assert M.eaurc(CONF_B, CORRECT_B) == pytest.approx(31 / 120, abs=1e-12)
    assert M.augrc(CONF_B, CORRECT_B) == pytest.approx(2 / 9, abs=1e-12)
    assert M.fpr_at_95tpr(CONF_B, CORRECT_B) == pytest.approx(2 / 3, abs=1e-12)
    result = M.failure_metrics(CONF_B, CORRECT_B)
    assert result["auroc"] == pytest.approx(11 / 18, abs=1e-12)
    assert result["accuracy"] == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_tied_metrics_do_not_depend_on_input_order(seed: int) -> None:
    """Ties enter together, so shuffling samples (which reorders members of a tie group)
    cannot change anything."""
    perm = np.random.default_rng(seed).permutation(len(CONF_B))
    expected = M.failure_metrics(CONF_B, CORRECT_B)
    shuffled = M.failure_metrics(CONF_B[perm], CORRECT_B[perm])
    for name in M.METRIC_NAMES:
        assert _nan_equal(shuffled[name], expected[name]), name


def test_fpr_at_95tpr_uses_95_percent_not_100() -> None:
    # 20 correct predictions scored 99, 98, ..., 80; 4 errors scored 95.5, 80.5, 50, 40.
    # TPR >= 0.95 first holds with 19/20 = 0.95 correct accepted: threshold 81.
    # Errors with score >= 81: only 95.5 -> FPR = 1/4.
    # (Requiring TPR = 1 would move the threshold to 80 and accept 80.5 too: FPR 2/4.)
    conf = np.r_[np.arange(99, 79, -1), [95.5, 80.5, 50.0, 40.0]].astype(float)
    correct = np.r_[np.ones(20, int), np.zeros(4, int)]
    assert M.fpr_at_95tpr(conf, correct) == pytest.approx(0.25, abs=1e-12)
    assert M.failure_metrics(conf, correct)["fpr_at_95tpr"] == pytest.approx(0.25, abs=1e-12)


def test_fpr_at_95tpr_perfect_separation_is_zero() -> None:
    conf = np.r_[np.linspace(1.0, 0.6, 30), np.linspace(0.5, 0.1, 5)]
    correct = np.r_[np.ones(30, int), np.zeros(5, int)]
    assert M.fpr_at_95tpr(conf, correct) == 0.0


def test_pr_error_curve_endpoints_and_aupr_error() -> None:
    precision, recall = M.pr_error_curve(CONF_A, CORRECT_A)
    assert recall[0] == 1.0 and recall[-1] == 0.0
    assert precision[-1] == 1.0
    # AP = sum over recall steps of precision: matches the hand-computed 3/4
    ap = -np.sum(np.diff(recall) * precision[:-1])
    assert ap == pytest.approx(0.75, abs=1e-12)


@FAST
@given(st.integers(0, 10_000), st.integers(2, 80), st.integers(2, 15))
def test_pr_error_curve_matches_sklearn(seed: int, n: int, levels: int) -> None:
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(seed)
    confidence = rng.integers(0, levels, n) / levels
    correct = rng.integers(0, 2, n)
    assume(correct.min() == 0)
    precision, recall = M.pr_error_curve(confidence, correct)
    expected_precision, expected_recall, _ = precision_recall_curve(1 - correct, -confidence)
    np.testing.assert_allclose(precision, expected_precision, atol=1e-12)
    np.testing.assert_allclose(recall, expected_recall, atol=1e-12)


def test_accepts_bool_correct_and_list_inputs() -> None:
    as_bool = M.failure_metrics(list(CONF_A), CORRECT_A.astype(bool))
    for name in M.METRIC_NAMES:
        assert as_bool[name] == pytest.approx(EXPECTED_A[name], abs=1e-12)


# --------------------------------------------------------------- brute-force references


def _brute_aurc(conf: np.ndarray, correct: np.ndarray) -> float:
    """Accept everything with score >= t, for every distinct t; rectangle rule."""
    n = len(conf)
    area, prev_cov = 0.0, 0.0
    for t in np.unique(conf)[::-1]:
        accepted = conf >= t
        cov = accepted.sum() / n
        risk = np.sum(accepted & (correct == 0)) / accepted.sum()
        area += (cov - prev_cov) * risk
        prev_cov = cov
    return area


def _brute_augrc(conf: np.ndarray, correct: np.ndarray) -> float:
    n = len(conf)
    xs, ys = [0.0], [0.0]
    for t in np.unique(conf)[::-1]:
        accepted = conf >= t
        xs.append(accepted.sum() / n)
        ys.append(np.sum(accepted & (correct == 0)) / n)
    return sum((xs[i] - xs[i - 1]) * (ys[i] + ys[i - 1]) / 2 for i in range(1, len(xs)))


def _brute_fpr95(conf: np.ndarray, correct: np.ndarray) -> float:
    pos, neg = conf[correct == 1], conf[correct == 0]
    for t in np.unique(conf)[::-1]:  # strictest threshold first
        if np.sum(pos >= t) / len(pos) >= 0.95:
            return float(np.mean(neg >= t))
    raise AssertionError("unreachable: TPR is 1 at the lowest score")


def _brute_auroc(conf: np.ndarray, correct: np.ndarray) -> float:
    """Mann-Whitney: P(conf_correct > conf_wrong) + 1/2 P(tie)."""
    pos, neg = conf[correct == 1], conf[correct == 0]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _random_case(seed: int, n: int = 200, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    correct = (rng.random(n) < 0.7).astype(int)
    conf = rng.normal(size=n) + 1.2 * correct
    if ties:
        conf = np.round(conf, 1)
    return conf, correct


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_agreement_with_sklearn_on_random_inputs(seed: int, ties: bool) -> None:
    conf, correct = _random_case(seed, ties=ties)
    result = M.failure_metrics(conf, correct)
    assert result["auroc"] == pytest.approx(roc_auc_score(correct, conf), abs=1e-12)
    assert result["aupr_success"] == pytest.approx(
        average_precision_score(correct, conf), abs=1e-12)
    assert result["aupr_error"] == pytest.approx(
        average_precision_score(1 - correct, -conf), abs=1e-12)
    # and with an implementation that shares no code with sklearn
    assert result["auroc"] == pytest.approx(_brute_auroc(conf, correct), abs=1e-12)
    assert result["accuracy"] == pytest.approx(correct.mean())


scores_and_labels = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        # small integer grid -> frequent ties
        st.lists(st.integers(0, 12), min_size=n, max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
)


@FAST
@given(scores_and_labels)
def test_aurc_augrc_fpr_match_brute_force(case: tuple[list[int], list[int]]) -> None:
    conf, correct = np.array(case[0], float), np.array(case[1])
    assert M.aurc(conf, correct) == pytest.approx(_brute_aurc(conf, correct), abs=1e-12)
    assert M.augrc(conf, correct) == pytest.approx(_brute_augrc(conf, correct), abs=1e-12)
    if 0 < correct.sum() < len(correct):
        assert M.fpr_at_95tpr(conf, correct) == pytest.approx(
            _brute_fpr95(conf, correct), abs=1e-12)
    else:
        assert math.isnan(M.fpr_at_95tpr(conf, correct))


# ------------------------------------------------------------------------ closed forms

tie_free = st.integers(min_value=2, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-100, 100, allow_nan=False), min_size=n, max_size=n, unique=True),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
)


@FAST
@given(tie_free)
def test_augrc_closed_form_on_tie_free_scores(case: tuple[list[float], list[int]]) -> None:
    conf, correct = np.array(case[0]), np.array(case[1])
    assume(0 < correct.sum() < len(correct))
    acc = correct.mean()
    auroc = roc_auc_score(correct, conf)
    expected = (1 - auroc) * acc * (1 - acc) + (1 - acc) ** 2 / 2
    assert M.augrc(conf, correct) == pytest.approx(expected, abs=1e-12)
    assert M.failure_metrics(conf, correct)["augrc"] == pytest.approx(expected, abs=1e-12)


def test_degenerate_augrc_closed_form() -> None:
    # all wrong: generalised risk = coverage, area 1/2 = (1 - 0)^2 / 2
    assert M.augrc(np.array([0.3, 0.2, 0.1]), np.zeros(3, int)) == pytest.approx(0.5)
    # all correct: no error, area 0
    assert M.augrc(np.array([0.3, 0.2, 0.1]), np.ones(3, int)) == 0.0


# ------------------------------------------------------------------------- invariance

with_transform = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 15), min_size=n, max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        # positive increments: a random strictly increasing map of the 16 grid values
        st.lists(st.floats(1e-3, 50.0), min_size=16, max_size=16),
        st.floats(-1e3, 1e3),
    )
)


@FAST
@given(with_transform)
def test_all_metrics_invariant_to_strictly_increasing_transform(case) -> None:
    values, correct, steps, offset = case
    conf = np.array(values, float)
    correct = np.array(correct)
    mapping = offset + np.cumsum(steps)  # strictly increasing in the grid value
    assert np.all(np.diff(mapping) > 0)
    transformed = mapping[np.array(values)]
    before = M.failure_metrics(conf, correct)
    after = M.failure_metrics(transformed, correct)
    for name in M.METRIC_NAMES:
        assert _nan_equal(after[name], before[name]), (name, before[name], after[name])


def test_strictly_decreasing_transform_changes_the_metrics() -> None:
    """Guard that the invariance test can fail: reversing the order changes AUROC."""
    before = M.failure_metrics(CONF_A, CORRECT_A)
    after = M.failure_metrics(-CONF_A, CORRECT_A)
    assert after["auroc"] == pytest.approx(1 - before["auroc"])
    assert after["aurc"] != pytest.approx(before["aurc"])


# ---------------------------------------------------------------------------- E-AURC


@pytest.mark.parametrize("correct", [[1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1, 0, 1, 0]])
def test_eaurc_zero_for_perfect_ranking(correct: list[int]) -> None:
    correct_arr = np.array(correct)
    # every correct prediction above every error, distinct scores
    conf = correct_arr * 10.0 + np.arange(len(correct_arr)) * 0.01
    assert M.eaurc(conf, correct_arr) == pytest.approx(0.0, abs=1e-12)
    assert M.aurc(conf, correct_arr) == pytest.approx(M.oracle_aurc(correct_arr), abs=1e-12)
    # and the worst ranking is strictly worse
    assert M.eaurc(-conf, correct_arr) > 0.01


@FAST
@given(scores_and_labels)
def test_eaurc_non_negative(case: tuple[list[int], list[int]]) -> None:
    conf, correct = np.array(case[0], float), np.array(case[1])
    assert M.eaurc(conf, correct) >= 0.0  # exactly: no floating-point slack


@pytest.mark.parametrize("n", range(2, 60))
def test_eaurc_of_a_perfect_ranking_is_exactly_zero(n: int) -> None:
    """Subtracting two separately rounded sums gave about -7e-18 for 15 samples with 12
    correct (and for a quarter of such cases), which the report printed as "-0.00" for the
    TCP oracle. Every split of n samples into correct and wrong, tied correct predictions
    at the top included, must give exactly 0."""
    for n_correct in range(1, n):
        correct = np.r_[np.ones(n_correct, int), np.zeros(n - n_correct, int)]
        distinct = -np.arange(n, dtype=float)
        tied_top = np.where(correct == 1, 1.0, distinct)
        for conf in (distinct, tied_top):
            assert M.eaurc(conf, correct) == 0.0, (n, n_correct)
            assert M.failure_metrics(conf, correct)["eaurc"] == 0.0, (n, n_correct)


@pytest.mark.parametrize("error_rate", [0.05, 0.2, 0.5])
def test_oracle_aurc_tends_to_closed_form_for_large_n(error_rate: float) -> None:
    n = 20_000
    n_err = round(error_rate * n)
    correct = np.r_[np.ones(n - n_err, int), np.zeros(n_err, int)]
    conf = -np.arange(n, dtype=float)  # perfect ranking, no ties
    r = error_rate
    closed = r + (1 - r) * math.log(1 - r)
    assert M.aurc(conf, correct) == pytest.approx(closed, abs=1e-3)
    assert M.oracle_aurc(correct) == pytest.approx(closed, abs=1e-3)
    # E-AURC of a random ranking ~ AURC minus the closed form
    rng = np.random.default_rng(0)
    random_conf = rng.random(n)
    assert M.eaurc(random_conf, correct) == pytest.approx(
        M.aurc(random_conf, correct) - closed, abs=1e-3)


# ------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("value", [0, 1])
def test_all_correct_or_all_wrong(value: int) -> None:
    conf = np.array([0.9, 0.5, 0.5, 0.1])
    correct = np.full(4, value)
    result = M.failure_metrics(conf, correct)
    for name in ("auroc", "aupr_success", "aupr_error", "fpr_at_95tpr"):
        assert math.isnan(result[name]), name
    assert math.isnan(M.fpr_at_95tpr(conf, correct))
    assert math.isnan(M.aupr_error(conf, correct))
    assert result["accuracy"] == value
    if value == 1:  # no error anywhere: every risk is 0
        assert (result["aurc"], result["eaurc"], result["augrc"]) == (0.0, 0.0, 0.0)
    else:  # every prediction wrong: risk 1 everywhere; any ranking is the oracle
        assert result["aurc"] == pytest.approx(1.0)
        assert result["eaurc"] == pytest.approx(0.0, abs=1e-12)
        assert result["augrc"] == pytest.approx(0.5)


def test_constant_scores_are_defined() -> None:
    conf = np.full(4, 0.3)
    correct = np.array([1, 0, 1, 1])
    result = M.failure_metrics(conf, correct)
    assert result["auroc"] == pytest.approx(0.5)
    assert result["aurc"] == pytest.approx(0.25)  # one point: coverage 1, risk 1/4
    assert result["fpr_at_95tpr"] == pytest.approx(1.0)  # must accept everything
    assert result["augrc"] == pytest.approx(0.125)  # (0,0) -> (1, 1/4)


def test_single_sample() -> None:
    result = M.failure_metrics(np.array([0.4]), np.array([0]))
    assert result["aurc"] == 1.0 and math.isnan(result["auroc"])


BAD_INPUTS = [
    pytest.param(np.array([]), np.array([]), "empty", id="empty"),
    pytest.param(np.array([0.1, 0.2, 0.3]), np.array([1, 0]), "3 samples.*2", id="mismatch"),
    pytest.param(np.array([0.1, np.nan, 0.3]), np.array([1, 0, 1]), "NaN", id="nan"),
    pytest.param(np.array([0.1, np.inf, 0.3]), np.array([1, 0, 1]), "infinite", id="inf"),
    pytest.param(np.array([0.1, -np.inf]), np.array([1, 0]), "infinite", id="-inf"),
    pytest.param(np.array([0.1, 0.2, 0.3]), np.array([1, 2, 0]), "0/1", id="non-binary-2"),
    pytest.param(np.array([0.1, 0.2]), np.array([0.5, 1.0]), "0/1", id="non-binary-half"),
    pytest.param(np.array([0.1, 0.2]), np.array([-1, 1]), "0/1", id="non-binary-neg"),
]

ALL_FUNCTIONS = [M.failure_metrics, M.aurc, M.eaurc, M.augrc, M.fpr_at_95tpr,
                 M.risk_coverage_curve, M.aupr_error, M.pr_error_curve, M.check_inputs]


@pytest.mark.parametrize("fn", ALL_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("conf", "correct", "message"), BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_problem(fn, conf, correct, message) -> None:
    with pytest.raises(ValueError, match=message):
        fn(conf, correct)


@pytest.mark.parametrize(("conf", "correct", "message"), BAD_INPUTS)
def test_paired_bootstrap_validates_inputs(conf, correct, message) -> None:
    good = np.linspace(0, 1, len(conf)) if len(conf) else conf
    with pytest.raises(ValueError, match=message):
        M.paired_bootstrap(conf, good, correct, "aurc", resamples=10, seed=0)


# -------------------------------------------------------------------- paired bootstrap


def _bootstrap_case(n: int = 150) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    correct = (rng.random(n) < 0.75).astype(int)
    informative = rng.normal(size=n) + 2.0 * correct
    noisy = rng.normal(size=n) + 0.3 * correct
    return informative, noisy, correct


def test_paired_bootstrap_deterministic_given_seed() -> None:
    a, b, correct = _bootstrap_case()
    first = M.paired_bootstrap(a, b, correct, "aurc", resamples=200, seed=3)
    second = M.paired_bootstrap(a, b, correct, "aurc", resamples=200, seed=3)
    other = M.paired_bootstrap(a, b, correct, "aurc", resamples=200, seed=4)
    assert first == second
    assert first[0] == other[0]  # observed difference does not depend on the seed
    assert (first[1], first[2]) != (other[1], other[2])


def test_paired_bootstrap_interval_contains_observed_difference() -> None:
    a, b, correct = _bootstrap_case()
    observed, low, high = M.paired_bootstrap(a, b, correct, "aurc", resamples=300, seed=0)
    assert observed == pytest.approx(M.aurc(a, correct) - M.aurc(b, correct))
    assert low <= observed <= high
    assert low < high
    # the informative score is clearly better (lower AURC): the interval excludes 0
    assert high < 0


def test_paired_bootstrap_identical_scores_zero_difference() -> None:
    a, _, correct = _bootstrap_case()
    assert M.paired_bootstrap(a, a.copy(), correct, "aurc", resamples=100, seed=0) == (
        0.0, 0.0, 0.0)


def test_paired_bootstrap_drops_undefined_resamples() -> None:
    # one error among 12: many resamples draw no error, where AUPR-Error is NaN
    conf_a = np.linspace(1.0, 0.0, 12)
    conf_b = conf_a[::-1].copy()
    correct = np.r_[np.ones(11, int), [0]]
    observed, low, high = M.paired_bootstrap(conf_a, conf_b, correct, "aupr_error",
                                             resamples=100, seed=1)
    assert observed == pytest.approx(1.0 - 1 / 12)
    assert np.isfinite(low) and np.isfinite(high)


def test_paired_bootstrap_all_resamples_undefined_gives_nan_interval() -> None:
    conf = np.array([0.2, 0.4, 0.6])
    observed, low, high = M.paired_bootstrap(conf, conf[::-1].copy(), np.ones(3, int),
                                             "aupr_error", resamples=20, seed=0)
    assert math.isnan(observed) and math.isnan(low) and math.isnan(high)


# ------------------------------------------------------- authors' convention, bootstrap


def test_authors_aurc_hand_case_b_with_ties() -> None:
    result = M.failure_metrics(CONF_B, CORRECT_B)
    assert result["aurc_authors"] == pytest.approx(0.225, abs=1e-12)
    assert result["eaurc_authors"] == pytest.approx(
        0.225 - (0.5 + 0.5 * math.log(0.5)), abs=1e-12)


def _authors_aurc_loop(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Their recipe spelled out: for each distinct score t, accept conf > t."""
    coverages, risks = [], []
    for t in np.unique(confidence):
        accepted = confidence > t
        if accepted.any():
            coverages.append(accepted.mean())
            risks.append(1 - correct[accepted].mean())
    order = np.argsort(coverages)
    return float(np.trapezoid(np.array(risks)[order], np.array(coverages)[order]))


@FAST
@given(st.integers(0, 10_000), st.integers(3, 60), st.integers(2, 12))
def test_authors_aurc_matches_threshold_loop(seed: int, n: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    confidence = rng.integers(0, levels, n) / levels  # ties on purpose
    correct = rng.integers(0, 2, n)
    assume(len(np.unique(confidence)) >= 3)
    got = M.failure_metrics(confidence, correct)["aurc_authors"]
    assert got == pytest.approx(_authors_aurc_loop(confidence, correct), abs=1e-12)


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate() -> None:
    rng = np.random.default_rng(3)
    correct = (rng.random(400) < 0.85).astype(int)
    confidence = correct * 0.4 + rng.random(400)
    first = M.bootstrap_intervals(confidence, correct, resamples=300, seed=7)
    again = M.bootstrap_intervals(confidence, correct, resamples=300, seed=7)
    other = M.bootstrap_intervals(confidence, correct, resamples=300, seed=8)
    assert first == again
    assert first != other
    observed = M.failure_metrics(confidence, correct)
    assert set(first) == set(M.METRIC_NAMES)
    for name, (low, high) in first.items():
        assert low <= observed[name] <= high, name
        assert low < high, name


def test_bootstrap_intervals_all_correct_gives_nan_bounds_for_undefined_metrics() -> None:
    confidence = np.linspace(0, 1, 50)
    intervals = M.bootstrap_intervals(confidence, np.ones(50, dtype=int), 50, seed=0)
    assert all(math.isnan(v) for v in intervals["auroc"])
    assert intervals["aurc"] == (0.0, 0.0)


# ------------------------------------------------- the sample bootstrap, all at once

def _materialised_draws(scores: dict[str, np.ndarray], correct: np.ndarray, resamples: int,
                        seed: int) -> dict[str, np.ndarray]:
    """The bootstrap as it reads: per resample, draw n of n with replacement, materialise
    the resample and score every method on it with ``failure_metrics``."""
    rng = np.random.default_rng(seed)
    n = correct.size
    draws = {m: np.empty((resamples, len(M.METRIC_NAMES))) for m in scores}
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        for method, conf in scores.items():
            values = failure_metrics(conf[idx], correct[idx])
            draws[method][i] = [values[name] for name in M.METRIC_NAMES]
    return draws


def _assert_same_draws(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-12)


bootstrap_cases = st.integers(min_value=1, max_value=30).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 5), min_size=n, max_size=n),  # few levels: ties everywhere
        st.lists(st.floats(0, 1, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.integers(0, 2**16),
    )
)


@FAST
@given(bootstrap_cases)
def test_sample_bootstrap_equals_scoring_each_materialised_resample(case) -> None:
    """Same draws, same values (to 1e-12) as scoring every materialised resample, with
    ties, constant scores, and resamples holding only correct predictions or only errors
    (a small n makes those frequent)."""
    levels, floats, correct_list, seed = case
    correct = np.array(correct_list)
    scores = {"tied": np.array(levels, float), "real": np.array(floats),
              "constant": np.zeros(correct.size)}
    got = M.bootstrap_draws(scores, correct, 25, seed)
    expected = _materialised_draws(scores, correct, 25, seed)
    for method in scores:
        _assert_same_draws(got[method], expected[method])


def test_sample_bootstrap_in_batches_is_the_same_bootstrap(monkeypatch) -> None:
    """Resamples drawn and scored a few at a time give the draws of one batch, and those
    of the materialised resamples (the draws continue one random stream); so do counts
    scored a few rows at a time."""
    rng = np.random.default_rng(5)
    correct = (rng.random(60) < 0.7).astype(int)
    scores = {"a": rng.integers(0, 8, 60) / 8, "b": rng.random(60)}
    whole = M.bootstrap_draws(scores, correct, 40, 11)
    monkeypatch.setattr(M, "_BATCH", 60 * 7)  # batches of 7 resamples
    batched = M.bootstrap_draws(scores, correct, 40, 11)
    expected = _materialised_draws(scores, correct, 40, 11)
    for method in scores:
        np.testing.assert_array_equal(batched[method], whole[method])
        _assert_same_draws(whole[method], expected[method])


def test_metrics_from_counts_a_few_rows_at_a_time_are_the_same(monkeypatch) -> None:
    rng = np.random.default_rng(9)
    size = rng.multinomial(40, np.full(30, 1 / 30), size=50)  # 40 samples in every row
    right = rng.binomial(size, 0.7)
    whole = [M._metrics_from_counts(right, size - right, per_sample_excess=excess)
             for excess in (True, False)]
    monkeypatch.setattr(M, "_BATCH", 30 * 4)  # 4 rows at a time
    for excess, expected in zip((True, False), whole, strict=True):
        np.testing.assert_array_equal(
            M._metrics_from_counts(right, size - right, per_sample_excess=excess), expected)


count_rows = st.integers(min_value=1, max_value=12).flatmap(
    lambda groups: st.lists(
        st.tuples(st.lists(st.integers(0, 4), min_size=groups, max_size=groups),
                  st.lists(st.integers(0, 4), min_size=groups, max_size=groups)),
        min_size=1, max_size=6))


@FAST
@given(count_rows, st.booleans())
def test_metrics_from_counts_are_those_of_the_drawn_tie_groups(rows, per_sample) -> None:
    """Each row's metrics are those of its non-empty tie groups, whatever the empty ones
    around them (leading, trailing, in between), with either E-AURC."""
    rows = [(r, w) for r, w in rows if sum(r) + sum(w) > 0]
    assume(rows)
    if per_sample:  # the per-sample E-AURC takes rows of one size, as the bootstrap's
        size = sum(rows[0][0]) + sum(rows[0][1])
        rows = [(r, w) for r, w in rows if sum(r) + sum(w) == size]
    right = np.array([r for r, _ in rows], float)
    wrong = np.array([w for _, w in rows], float)
    got = M._metrics_from_counts(right, wrong, per_sample_excess=per_sample)
    for i, (r, w) in enumerate(zip(right, wrong, strict=True)):
        keep = (r + w) > 0
        # integer counts, as _TieGroups.of makes them
        groups = M._TieGroups(r[keep].astype(int), w[keep].astype(int), np.empty(0))
        values = M._metrics_from_groups(groups, per_sample_excess=per_sample)
        _assert_same_draws(got[i], np.array([values[name] for name in M.METRIC_NAMES]))


def test_the_draws_test_can_fail() -> None:
    """Another seed's draws, or a metric computed otherwise, do not pass for these."""
    rng = np.random.default_rng(2)
    correct = (rng.random(40) < 0.7).astype(int)
    scores = {"a": rng.random(40)}
    expected = _materialised_draws(scores, correct, 20, 0)["a"]
    with pytest.raises(AssertionError):
        _assert_same_draws(M.bootstrap_draws(scores, correct, 20, 1)["a"], expected)
    shifted = M.bootstrap_draws(scores, correct, 20, 0)["a"].copy()
    shifted[:, M.METRIC_NAMES.index("aurc_authors")] += 1e-9
    with pytest.raises(AssertionError):
        _assert_same_draws(shifted, expected)


def _run(n: int, seed: int, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correctness and two scores: ``a`` separates errors better than ``b`` by ``shift``."""
    rng = np.random.default_rng(seed)
    correct = (rng.random(n) < 0.8).astype(int)
    noise = rng.normal(size=n)
    return noise + (1 + shift) * correct, rng.normal(size=n) + correct, correct


def test_seed_paired_bootstrap_with_one_run_is_the_paired_bootstrap() -> None:
    a, b, correct = _run(300, 0, 0.5)
    pooled = seed_paired_bootstrap([a], [b], [correct], ["aupr_error", "auroc"], 200, 7)
    for metric in ("aupr_error", "auroc"):
        observed, low, high = paired_bootstrap(a, b, correct, metric, 200, 7)
        assert pooled[metric]["mean_diff"] == pytest.approx(observed)
        assert pooled[metric]["ci"] == pytest.approx([low, high])
        assert pooled[metric]["per_seed"] == pytest.approx([observed])


def test_seed_paired_bootstrap_averages_seeds_and_resamples_within_each() -> None:
    runs = [_run(400, s, 1.0) for s in range(3)]
    out = seed_paired_bootstrap([r[0] for r in runs], [r[1] for r in runs],
                                [r[2] for r in runs], ["aupr_error"], 300, 0)["aupr_error"]
    per_seed = [failure_metrics(a, c)["aupr_error"] - failure_metrics(b, c)["aupr_error"]
                for a, b, c in runs]
    assert out["per_seed"] == pytest.approx(per_seed)
    assert out["mean_diff"] == pytest.approx(np.mean(per_seed))
    low, high = out["ci"]
    assert low < out["mean_diff"] < high
    assert low > 0  # a real, large advantage is detected
    # three seeds pooled give a narrower interval than one seed alone
    one = seed_paired_bootstrap([runs[0][0]], [runs[0][1]], [runs[0][2]], ["aupr_error"],
                                300, 0)["aupr_error"]["ci"]
    assert high - low < one[1] - one[0]


def test_seed_paired_bootstrap_of_a_method_against_itself_is_zero() -> None:
    a, _, correct = _run(200, 3, 0.0)
    out = seed_paired_bootstrap([a, a], [a, a], [correct, correct], ["aupr_error"], 100, 0)
    assert out["aupr_error"]["mean_diff"] == 0.0 and out["aupr_error"]["ci"] == [0.0, 0.0]


def test_seed_paired_bootstrap_rejects_mismatched_runs() -> None:
    a, b, correct = _run(50, 0, 0.0)
    with pytest.raises(ValueError, match="same number"):
        seed_paired_bootstrap([a, a], [b], [correct, correct], ["auroc"], 10, 0)
    with pytest.raises(ValueError, match="unknown metric 'aupr'"):
        seed_paired_bootstrap([a], [b], [correct], ["aupr"], 10, 0)


# ------------------------------------------------------------------------- comparison


def test_comparison_takes_a_side_only_when_the_interval_excludes_zero() -> None:
    # A minus B; AUPR-Error: higher is better, AURC and FPR: lower is better.
    assert M.comparison("aupr_error", 0.01, 0.05) == "better"
    assert M.comparison("aupr_error", -0.05, -0.01) == "worse"
    assert M.comparison("aupr_error", -0.01, 0.05) == "n.s."
    assert M.comparison("aupr_error", 0.0, 0.05) == "n.s."  # zero is in the interval
    assert M.comparison("aurc", -0.05, -0.01) == "better"
    assert M.comparison("aurc", 0.01, 0.02) == "worse"
    assert M.comparison("fpr_at_95tpr", -0.05, -0.01) == "better"
    assert M.comparison("aupr_error", math.nan, math.nan) == "n/a"
    assert M.LOWER_IS_BETTER.issubset(M.METRIC_NAMES)
    with pytest.raises(ValueError, match="unknown metric 'aupr'; valid: accuracy, auroc"):
        M.comparison("aupr", 0.01, 0.05)
