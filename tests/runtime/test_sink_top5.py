"""The sink's top-5 (quantpipe.runtime.sink.top5) against a plain reference: a full stable sort and a
float64 softmax per image."""

from __future__ import annotations

import numpy as np
import pytest

from quantpipe.runtime.sink import top5


def _reference(logits: np.ndarray) -> list:
    z = logits.reshape(logits.shape[0], -1)
    out = []
    for row in z.astype(np.float64):
        order = np.lexsort((np.arange(row.size), -row))[: min(5, row.size)]  # by value, then lower index
        p = np.exp(row - row.max())
        out.append([[int(c), round(float(p[c] / p.sum()), 6)] for c in order])
    return out


@pytest.mark.parametrize("shape", [(32, 197, 192), (8, 1000), (3, 4), (1, 1), (5, 7)])
def test_top5_is_the_five_largest_with_their_softmax(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        y = rng.standard_normal(shape).astype(np.float32)
        assert top5(y) == _reference(y)


def test_ties_go_to_the_lower_index_and_minus_inf_rows_still_give_five():
    y = np.array([[1, 3, 3, 2, 3, 3, 3], [0, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf, 5]], dtype=np.float32)
    got = top5(y)
    assert [c for c, _ in got[0]] == [1, 2, 4, 5, 6]
    assert [c for c, _ in got[1]] == [6, 0, 1, 2, 3]
    assert got == _reference(y)
