"""minillm.metrics against scikit-learn, the reference for what accuracy, macro precision / recall /
F1 and the confusion matrix mean, including classes that never occur or are never predicted
(scikit-learn's `zero_division=0`); and labels outside the classes, which are an error."""
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.metrics import classification_report, confusion_matrix

MORE = settings(max_examples=max(50, settings.default.max_examples))


@pytest.fixture(scope="module")
def skm():
    return pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("labels,predictions,words", [
    ([0, 1], [3, 0], ["prediction 3", "item 0"]),  # used to be counted as cm[1][0]
    ([0, 1], [0, 7], ["prediction 7", "item 1"]),  # used to be a bare RuntimeError (from reshape)
    ([0, 3], [0, 0], ["true label 3", "item 1"]),
    ([-1, 0], [0, 0], ["true label -1", "item 0"]),  # used to be a bare RuntimeError from bincount
    ([0, 0], [0, -2], ["prediction -2", "item 1"]),
])
def test_confusion_matrix_refuses_labels_outside_the_classes(labels, predictions, words):
    with pytest.raises(ValueError) as e:
        confusion_matrix(labels, predictions, 3)
    assert all(w in str(e.value) for w in words) and "3 classes" in str(e.value), str(e.value)
    with pytest.raises(ValueError):
        classification_report(labels, predictions, 3)


def test_labels_inside_the_classes_are_counted_as_sklearn_does(skm):
    y, p = [0, 1, 2, 2, 1], [0, 2, 2, 0, 1]
    assert confusion_matrix(y, p, 3).tolist() == skm.confusion_matrix(y, p, labels=[0, 1, 2]).tolist()


def _sklearn_report(skm, y, p, k):
    labels = list(range(k))
    with warnings.catch_warnings():
        # scikit-learn warns of a single label in y and p even when `labels` names them all
        warnings.simplefilter("ignore", UserWarning)
        cm = skm.confusion_matrix(y, p, labels=labels).tolist()
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, p, labels=labels, average="macro", zero_division=0)
    per_class = skm.f1_score(y, p, labels=labels, average=None, zero_division=0)
    return {"accuracy": skm.accuracy_score(y, p), "precision": prec, "recall": rec, "f1": f1,
            "per_class_f1": list(per_class), "confusion": cm}


def _assert_same(ours, ref):
    assert ours["confusion"] == ref["confusion"]
    for key in ("accuracy", "precision", "recall", "f1", "per_class_f1"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_classes_that_never_occur_or_are_never_predicted(skm):
    """Class 2 never occurs and is never predicted, class 3 is predicted but never occurs, class 1
    occurs but is never predicted: each one's score is 0 and still counts in the macro mean."""
    y, p = [0, 0, 1, 1, 0], [0, 3, 0, 0, 0]
    _assert_same(classification_report(y, p, 4), _sklearn_report(skm, y, p, 4))


@st.composite
def labelled(draw):
    k = draw(st.integers(1, 6))  # with up to 6 classes and few items, some classes are often missing
    pairs = draw(st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=30))
    return k, [a for a, _ in pairs], [b for _, b in pairs]


@MORE
@given(labelled())
def test_metrics_agree_with_sklearn(skm, case):
    k, y, p = case
    _assert_same(classification_report(y, p, k), _sklearn_report(skm, y, p, k))
