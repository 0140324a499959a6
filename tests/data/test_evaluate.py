"""Comparing a model's outputs with a reference's: collect_logits and compare_logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vmfx.data.evaluate import collect_logits, compare_logits, evaluate
from vmfx.errors import CalibrationDataError


class FixedLogits(nn.Module):
    """Returns the stored logits of the images it is given (images are their own row indices)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, idx):
        return self.logits[idx.long().flatten()]


def _kl_numpy(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, in float64 from the definition."""
    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(p_logits.astype(np.float64)), softmax(q_logits.astype(np.float64))
    return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), axis=1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), classes=st.integers(2, 12), scale=st.floats(0.1, 20.0), seed=st.integers(0, 2**31 - 1))
def test_compare_logits_matches_a_float64_reference(n, classes, scale, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, classes, generator=g) * scale
    out = ref + torch.randn(n, classes, generator=g) * scale * 0.3
    labels = torch.randint(0, classes, (n,), generator=g)
    res = compare_logits(ref, out, labels)
    kl = _kl_numpy(ref.numpy(), out.numpy())
    assert res.kl_per_image.numpy() == pytest.approx(np.maximum(kl, 0.0), rel=1e-9, abs=1e-12)
    assert res.kl == pytest.approx(float(np.maximum(kl, 0.0).mean()), rel=1e-9, abs=1e-12)
    agrees = ref.argmax(-1) == out.argmax(-1)
    assert res.agree == pytest.approx(100.0 * agrees.double().mean().item())
    assert torch.equal(res.correct, out.argmax(-1) == labels)
    # the same accuracy as evaluate() on the same outputs
    ev = evaluate(FixedLogits(out), (torch.arange(n), labels), batch_size=7)
    assert (res.top1, res.top5, res.images) == (ev.top1, ev.top5, ev.images)


def test_a_model_compared_with_itself_agrees_fully():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 5
    res = compare_logits(logits, logits.clone(), torch.zeros(50, dtype=torch.long))
    assert res.agree == 100.0 and res.kl == 0.0 and bool(res.agrees.all())


def test_collect_logits_is_one_pass_in_data_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    images, labels = torch.randn(23, 3, 2, 2), torch.randint(0, 5, (23,))
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    logits, got_labels = collect_logits(model, (images, labels), batch_size=10)
    assert calls == [10, 10, 3]
    assert torch.allclose(logits, model(images), atol=1e-6) and torch.equal(got_labels, labels)


def test_mismatched_outputs_are_refused():
    with pytest.raises(CalibrationDataError, match="same images"):
        compare_logits(torch.zeros(4, 10), torch.zeros(5, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(CalibrationDataError, match="labels"):
        compare_logits(torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(CalibrationDataError, match="empty"):
        collect_logits(nn.Identity(), (torch.zeros(0, 3), torch.zeros(0)))
