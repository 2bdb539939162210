"""darts.loop: the evaluation both run loops share, against a computation written out by hand."""
import numpy as np
import pytest

from darts import loop
from darts.errors import UserError


class Chunks:
    """Batches as ArrayBatches gives them: epoch(0) yields (x, y), here with an empty share in between."""

    def __init__(self, logits, labels, sizes):
        self.parts, start = [], 0
        for n in sizes:
            self.parts.append((logits[start:start + n], labels[start:start + n]))
            start += n

    def epoch(self, epoch):
        yield from self.parts


def by_hand(logits, labels, losses, k):
    """(mean loss, top-1, top-5, confusion) image by image."""
    top1 = top5 = 0
    confusion = np.zeros((k, k), np.int64)
    for row, y in zip(logits, labels):
        order = sorted(range(k), key=lambda j: -row[j])
        top1 += order[0] == y
        top5 += y in order[:5]
        confusion[y, order[0]] += 1
    return float(np.mean(losses)), top1 / len(labels), top5 / len(labels), confusion


def test_evaluate_matches_a_computation_by_hand():
    rng = np.random.default_rng(0)
    k, n = 7, 53
    logits = rng.normal(size=(n, k)).astype('float32')
    labels = rng.integers(0, k, n)
    per_image = rng.uniform(0, 3, n)   # the "loss" of each image; a batch's loss is their mean
    sizes = [20, 0, 25, 8]
    batches = Chunks(logits, labels, sizes)
    index = {id(x): start for (x, _), start in zip(batches.parts, np.cumsum([0] + sizes[:-1]))}

    def run_batch(x, y):
        start = index[id(x)]
        return float(per_image[start:start + len(y)].mean()), x
    loss, top1, top5, confusion = loop.evaluate(run_batch, batches, k)
    want = by_hand(logits, labels, per_image, k)
    assert loss == pytest.approx(want[0], rel=1e-12)
    assert (top1, top5) == pytest.approx(want[1:3])
    assert top1 < top5 < 1
    np.testing.assert_array_equal(confusion, want[3])
    # summed over two identical "ranks": the same fractions, twice the counts
    loss2, top1_2, top5_2, confusion2 = loop.evaluate(run_batch, batches, k, reduce=lambda v: 2 * np.asarray(v))
    assert (loss2, top1_2, top5_2) == pytest.approx((loss, top1, top5))
    np.testing.assert_array_equal(confusion2, 2 * want[3])


def test_evaluate_without_images_is_one_line():
    with pytest.raises(UserError, match='no readable images'):
        loop.evaluate(lambda x, y: (0.0, x), Chunks(np.zeros((0, 3)), np.zeros(0, int), [0, 0]), 3)
