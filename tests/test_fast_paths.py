"""The fast paths of the audit give the results of the slow ones.

Spectral norms by power iteration on the Gram matrix; tensor nodes found by a fake-tensor run; the
self-check's comparisons against a reference whose scale is worked out once.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from wssi_audit import audit
from wssi_audit.analysis import metrics
from wssi_audit.analysis.metrics import spectral_norms
from wssi_audit.analysis.verify import Reference, relative_error


def _stacks() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 64, 576), (3, 7, 5), (2, 9, 4), (1, 1, 9), (4, 8, 8), (1, 40, 30), (1, 30, 40)]
    stacks = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    return [*stacks, torch.zeros(1, 4, 9, dtype=torch.float64)]


def test_gram_path_matches_plain_power_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = spectral_norms(_stacks())
    monkeypatch.setattr(metrics, "GRAM_MAX_SIDE", 0)  # every stack through the plain iteration
    plain = spectral_norms(_stacks())
    assert fast == pytest.approx(plain, rel=1e-12, abs=1e-300)
    assert fast[-1] == 0.0


def test_power_iteration_converges_to_the_spectral_norm() -> None:
    """Matrices with a clear top singular value: both paths agree with the SVD."""
    generator = torch.Generator().manual_seed(1)
    stacks = []
    for rows, cols in ((50, 20), (20, 50)):
        u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
        singular = torch.linspace(1.0, 0.1, min(rows, cols), dtype=torch.float64)
        singular[0] = 3.0
        middle = torch.zeros(rows, cols, dtype=torch.float64)
        middle[range(len(singular)), range(len(singular))] = singular
        stacks.append((u @ middle @ v.T).unsqueeze(0))
    assert spectral_norms(stacks) == pytest.approx([3.0, 3.0], rel=1e-9)


class ValueDependent(nn.Module):
    """Reads a tensor's value: symbolic tracing makes it a leaf, fake tensors cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if float(x.mean()) > -1e9 else x


def test_a_model_fake_tensors_cannot_run_is_run_for_real() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), ValueDependent(), nn.ReLU(), nn.Linear(4, 2)).eval()
    report = audit(model, (torch.randn(3, 4),))
    assert report.trace.method == "fx+leaves"
    assert {u.node for u in report.trace.unanalyzed} == {"2"}
    assert report.summary.all_verified is True


def test_auditing_a_model_in_training_mode_leaves_its_batch_norm_statistics_alone() -> None:
    """Regression: the input-shape check ran a training-mode forward, updating running stats."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = audit(model, (torch.randn(2, 3, 8, 8) + 3.0,))
    assert report.summary.all_verified is True
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


_FINITE = st.floats(min_value=-1e6, max_value=1e6)
# mostly finite entries, some exact zeros, now and then an Inf or a NaN
_ENTRIES = st.one_of(_FINITE, _FINITE, _FINITE, _FINITE, st.just(0.0), st.sampled_from([math.inf, -math.inf, math.nan]))


@st.composite
def _tensor_lists(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pairs of tensor lists like a self-check compares: mostly alike, sometimes non-finite, empty,
    of another shape or another count."""
    count = draw(st.integers(1, 3))
    reference, other = [], []
    for _ in range(count):
        shape = draw(st.sampled_from([(0,), (3,), (2, 2)]))
        size = math.prod(shape)
        a = torch.tensor(draw(st.lists(_ENTRIES, min_size=size, max_size=size)), dtype=torch.float64).reshape(shape)
        b = a + torch.tensor(draw(st.lists(_ENTRIES, min_size=size, max_size=size)), dtype=torch.float64).reshape(
            shape
        ) * draw(st.sampled_from([0.0, 1e-12, 1.0]))
        if draw(st.booleans()) and size:
            b = b.reshape(-1)[:-1]  # another shape
        reference.append(a)
        other.append(b)
    if draw(st.booleans()):
        other = other[: draw(st.integers(0, count))]  # another count
    return reference, other


def _plain_relative_error(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """An independent reference: the comparison written out pair by pair, nothing worked out ahead."""
    scale, diff = 0.0, 0.0
    for a, b in zip(reference, other):
        if not a.numel():
            continue
        if a.shape != b.shape or not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
            return math.nan
        scale = max(scale, float(a.abs().max()))
        diff = max(diff, float((a - b).abs().max()))
    return diff / scale if scale > 0 else diff


@settings(max_examples=300, deadline=None)
@given(_tensor_lists())
def test_a_reference_compares_as_the_plain_loop_does(pair: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    """The self-check's reference, its scale worked out once, gives the plain comparison's result,
    reused or not (relative_error)."""
    reference, other = pair
    expected = _plain_relative_error(reference, other)
    kept = Reference(reference)
    for got in (kept.error(other), kept.error(other), relative_error(reference, other)):
        assert (math.isnan(got) and math.isnan(expected)) or got == expected
