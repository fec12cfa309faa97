"""Metrics against scikit-learn, including classes missing from the labels."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from raug.train import metrics as M

K = 8


def sample(n=300, k=K, seed=0, drop=()):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    for c in drop:
        y[y == c] = (c + 1) % k
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("drop", [(), (3,), (3, 7)])
def test_against_sklearn(drop):
    y, probs = sample(drop=drop)
    pred = probs.argmax(axis=1)
    assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    with warnings.catch_warnings():
        # sklearn warns that y_pred holds classes absent from y_true: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        expected_bacc = skm.balanced_accuracy_score(y, pred)
    assert M.balanced_accuracy(y, pred, K) == pytest.approx(expected_bacc, abs=1e-12)
    np.testing.assert_array_equal(M.confusion_matrix(y, pred, K),
                                  skm.confusion_matrix(y, pred, labels=range(K)))
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=range(K), zero_division=0)
    mp, mr, mf = M.precision_recall_f1(y, pred, K)
    np.testing.assert_allclose(mp, p, atol=1e-12)
    np.testing.assert_allclose(mr, r, atol=1e-12)
    np.testing.assert_allclose(mf, f, atol=1e-12)
    assert M.top_k_accuracy(y, probs, 2) == pytest.approx(
        skm.top_k_accuracy_score(y, probs, k=2, labels=range(K)), abs=1e-12)

    aucs = M.per_class_auc(y, probs)
    for c in range(K):
        if c in drop:
            assert np.isnan(aucs[c])
        else:
            assert aucs[c] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]), abs=1e-12)
    present = [c for c in range(K) if c not in drop]
    assert M.macro_auc(y, probs) == pytest.approx(np.mean(aucs[present]), abs=1e-12)


def test_balanced_accuracy_ignores_classes_absent_from_y_true():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 3, 1, 1, 2, 3])  # class 3 only predicted, never true
    # recalls: 0 -> 1/2, 1 -> 1, 2 -> 1/2; class 3 does not count
    assert M.balanced_accuracy(y, pred, num_classes=4) == pytest.approx((0.5 + 1 + 0.5) / 3)


def test_auc_with_ties_matches_sklearn():
    y = np.array([1, 0, 1, 0, 1, 0, 0])
    s = np.array([0.5, 0.5, 0.9, 0.1, 0.5, 0.9, 0.2])
    assert M.binary_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(M.binary_auc(np.ones(4), s[:4]))


def test_normalized_confusion_rows_sum_to_one_or_zero():
    cm = np.array([[2, 2, 0], [0, 0, 0], [1, 0, 3]])
    norm = M.normalize_confusion(cm)
    np.testing.assert_allclose(norm.sum(axis=1), [1, 0, 1])
    assert norm[0, 0] == 0.5


def test_classification_metrics_names_and_values():
    y, probs = sample(n=120, drop=(2,))
    names = ["AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC"]
    out = M.classification_metrics(y, probs, names, prefix="test.")
    assert out["test.n"] == 120
    assert out["test.balanced_accuracy"] == M.balanced_accuracy(y, probs.argmax(1), K)
    assert "test.auc.BKL" not in out  # absent class: no AUC, skipped in the macro mean
    assert out["test.auc"] == pytest.approx(np.mean([out[f"test.auc.{n}"] for n in names if n != "BKL"]))
    assert out["test.support.BKL"] == 0
    assert M.skipped_auc_classes(y, probs, names) == ["BKL"]


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200).astype(bool)
    s = np.round(rng.random(200) + 0.3 * y, 2)  # rounded: many ties
    fpr, tpr = M.roc_points(y, s)
    ref_fpr, ref_tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.binary_auc(y, s), abs=1e-12)


# ---------------------------------------------------------------- fixed inputs against sklearn
# Hand-written, K = 8: class 5 never occurs in Y (only predicted), class 7 once; scores in
# twentieths, so many probabilities tie, within a row and between samples of a column.
Y = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 6, 6, 7, 1])
COUNTS = np.array([
    [10, 4, 2, 1, 1, 1, 1, 0],
    [5, 5, 5, 1, 1, 1, 1, 1],  # true class tied with two others for the top
    [2, 12, 2, 1, 1, 1, 1, 0],
    [6, 6, 2, 2, 2, 1, 1, 0],
    [1, 1, 14, 1, 1, 1, 1, 0],
    [2, 2, 4, 2, 2, 6, 1, 1],  # predicted: class 5, absent from Y
    [4, 2, 4, 4, 2, 2, 2, 0],
    [1, 1, 1, 10, 4, 1, 1, 1],
    [4, 1, 1, 4, 4, 4, 1, 1],
    [0, 2, 2, 2, 10, 2, 2, 0],
    [2, 2, 2, 2, 4, 6, 2, 0],
    [2, 2, 2, 2, 4, 4, 4, 0],
    [1, 1, 1, 1, 1, 1, 12, 2],
    [2, 2, 2, 2, 2, 2, 4, 4],
    [2, 2, 2, 2, 2, 2, 4, 4],
    [4, 4, 4, 4, 1, 1, 1, 1],
])
PROBS = COUNTS / 20.0
PRED = PROBS.argmax(axis=1)
# the same ranking with every tie inside a row broken (class index as the last digit)
PROBS_NO_TIES = (COUNTS * 10 + np.arange(K)) / 1000.0


def exact_auc(is_positive, scores) -> float:
    """Mann-Whitney AUC as an exact fraction (ties count 1/2), rounded once to float."""
    from fractions import Fraction

    pos, neg = scores[is_positive], scores[~is_positive]
    wins = sum(Fraction(int(p > n) * 2 + int(p == n), 2) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def test_fixed_inputs_counts_and_rates_equal_sklearn():
    # Exact equality: each value is one division of small integer counts (or a mean of such
    # values in the same order), computed the same way by sklearn and by raug.train.metrics.
    assert M.accuracy(Y, PRED) == skm.accuracy_score(Y, PRED)
    cm = M.confusion_matrix(Y, PRED, K)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, skm.confusion_matrix(Y, PRED, labels=range(K)))
    np.testing.assert_array_equal(M.normalize_confusion(cm),
                                  skm.confusion_matrix(Y, PRED, labels=range(K), normalize="true"))
    assert M.normalize_confusion(cm)[5].tolist() == [0.0] * K  # absent class: an empty row stays 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # class 5 is predicted but never true
        expected_bacc = skm.balanced_accuracy_score(Y, PRED)
    assert M.balanced_accuracy(Y, PRED, K) == expected_bacc
    assert M.balanced_accuracy(Y, PRED) == expected_bacc
    p, r, f, support = skm.precision_recall_fscore_support(Y, PRED, labels=range(K), zero_division=0)
    mp, mr, mf = M.precision_recall_f1(Y, PRED, K)
    np.testing.assert_array_equal(mp, p)
    np.testing.assert_array_equal(mr, r)
    # F1 is 2PR/(P+R) here and 2TP/(2TP+FP+FN) in sklearn: equal as fractions, but rounded
    # differently, so they may differ in the last bit (~1e-16); 1e-12 bounds that
    np.testing.assert_allclose(mf, f, rtol=0, atol=1e-12)
    out = M.classification_metrics(Y, PROBS, list("ABCDEFGH"))
    assert [out[f"support.{n}"] for n in "ABCDEFGH"] == support.tolist()


def test_fixed_inputs_auc_and_roc_equal_sklearn():
    aucs = M.per_class_auc(Y, PROBS)
    assert np.isnan(aucs[5])  # class 5 has no positive
    for c in [0, 1, 2, 3, 4, 6, 7]:
        positive = np.equal(Y, c)
        # exact: the AUC is the correctly rounded Mann-Whitney fraction (one rounding)
        assert aucs[c] == exact_auc(positive, PROBS[:, c])
        # sklearn integrates float rates, which can be off in the last bit: 1e-12 bounds that
        assert aucs[c] == pytest.approx(skm.roc_auc_score(positive, PROBS[:, c]), rel=0, abs=1e-12)
        fpr, tpr = M.roc_points(positive, PROBS[:, c])
        ref_fpr, ref_tpr, _ = skm.roc_curve(positive, PROBS[:, c], drop_intermediate=False)
        # exact: every rate is one division count / total in both
        np.testing.assert_array_equal(fpr, ref_fpr)
        np.testing.assert_array_equal(tpr, ref_tpr)
    defined = [skm.roc_auc_score(np.equal(Y, c), PROBS[:, c]) for c in [0, 1, 2, 3, 4, 6, 7]]
    # a mean of seven values, each within 1e-12 of sklearn's: the mean is too
    assert M.macro_auc(Y, PROBS) == pytest.approx(np.mean(defined), rel=0, abs=1e-12)
    assert M.macro_auc(Y, PROBS) == np.mean(aucs[[0, 1, 2, 3, 4, 6, 7]])
    assert M.skipped_auc_classes(Y, PROBS, list("ABCDEFGH")) == ["F"]


def test_class_with_only_positives_has_no_auc():
    y = np.full(6, 3)  # every sample is class 3: it has no negative, the others no positive
    probs = PROBS[:6]
    with pytest.warns(UndefinedMetricWarning, match="Only one class"):
        assert np.isnan(skm.roc_auc_score(y == 3, probs[:, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # here: the same nan, without the warning
        assert np.isnan(M.binary_auc(y == 3, probs[:, 3]))
    assert np.isnan(M.per_class_auc(y, probs)).all()
    assert np.isnan(M.macro_auc(y, probs))
    assert M.skipped_auc_classes(y, probs, list("ABCDEFGH")) == list("ABCDEFGH")
    fpr, tpr = M.roc_points(y == 3, probs[:, 3])
    assert fpr[0] == 0.0
    assert np.isnan(fpr[1:]).all()  # no negative: undefined after the origin
    with pytest.warns(UndefinedMetricWarning):
        np.testing.assert_array_equal(tpr, skm.roc_curve(y == 3, probs[:, 3])[1])
    out = M.classification_metrics(y, probs, list("ABCDEFGH"))
    assert np.isnan(out["auc"])
    assert not any(key.startswith("auc.") for key in out)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_accuracy_without_ties_equals_sklearn(k):
    # exact: a count of hits over 16 samples, one division in both
    assert M.top_k_accuracy(Y, PROBS_NO_TIES, k) == skm.top_k_accuracy_score(
        Y, PROBS_NO_TIES, k=k, labels=range(K))


def test_top_k_accuracy_counts_ties_in_the_samples_favour():
    y = np.array([1])
    probs = np.array([[0.5, 0.25, 0.25, 0, 0, 0, 0, 0]])  # class 1 tied with class 2 for 2nd
    assert M.top_k_accuracy(y, probs, 2) == 1.0
    # sklearn breaks the tie by index (class 2 first), so the sample misses there
    assert skm.top_k_accuracy_score(y, probs, k=2, labels=range(K)) == 0.0
    # on the tied fixture: row 1 (true class 0 tied for first with 1 and 2) is a top-1 hit
    assert M.top_k_accuracy(Y[1:2], PROBS[1:2], 1) == 1.0


def test_empty_inputs_give_nan_without_warnings():
    y, probs = np.array([], dtype=int), np.zeros((0, K))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(M.accuracy(y, y))
        assert np.isnan(M.balanced_accuracy(y, y, K))
        assert np.isnan(M.top_k_accuracy(y, probs, 2))
        assert np.isnan(M.macro_auc(y, probs))
        np.testing.assert_array_equal(M.confusion_matrix(y, y, K), np.zeros((K, K), dtype=np.int64))
        for values in M.precision_recall_f1(y, y, K):
            np.testing.assert_array_equal(values, np.zeros(K))
        out = M.classification_metrics(y, probs, list("ABCDEFGH"))
    assert out["n"] == 0
    assert np.isnan(out["accuracy"])
    assert np.isnan(out["auc"])
