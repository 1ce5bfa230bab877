"""``sampling.draw``: inverse-CDF sampling from one uniform number draws each index with its probability, never an
index of weight 0, and repeats itself for a seed."""

from __future__ import annotations

import torch

from lmforge.serve.sampling import draw


def test_draw_follows_the_weights_and_never_takes_a_zero():
    w = torch.tensor([0.0, 0.1, 0.0, 0.4, 0.2, 0.0, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 8000
    counts = torch.bincount(torch.tensor([draw(w, g) for _ in range(n)]), minlength=len(w)).double()
    assert counts[w == 0].sum() == 0
    expected = w.double() * n / w.sum()
    chi2 = float((((counts - expected) ** 2)[w > 0] / expected[w > 0]).sum())
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001
    # a classic off-by-one (taking the entry before the first cumulative sum above u) fails the same check
    shifted = torch.roll(w, 1)
    bad = float((((counts - shifted.double() * n) ** 2)[shifted > 0] / (shifted.double() * n)[shifted > 0]).sum())
    assert bad > 100


def test_draw_is_reproducible_and_takes_unnormalised_weights():
    w = torch.rand(49152) ** 8
    a = [draw(w, torch.Generator().manual_seed(s)) for s in range(20)]
    assert a == [draw(w * 3.0, torch.Generator().manual_seed(s)) for s in range(20)]
    assert draw(torch.tensor([0.0, 0.0, 5.0]), torch.Generator().manual_seed(1)) == 2
