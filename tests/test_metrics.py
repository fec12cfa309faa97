"""Metrics against scikit-learn, including classes missing from the labels."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from raug import metrics as M

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
