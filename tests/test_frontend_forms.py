"""Every graph form torch emits reads as the same structure.

Core ATen IR (`run_decompositions()`, every release) writes BatchNorm as the tuple-returning
`_native_batch_norm_legit_no_training` + getitem (torch 2.4's plain export did too), keeps the unused
statistics outputs as extra getitem nodes once saved and loaded, writes Linear as
addmm(bias, x, permute(W)), max pooling as `max_pool2d_with_indices` + getitem and reshape as
clone + _unsafe_view. Each form must give the chains, residual blocks and folded BatchNorms that
symbolic tracing gives, verified by the self-check, on whichever torch runs the suite (CI: the
floor, 2.9.0, and the newest, 2.14.1).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import example_model, with_bn_statistics
from wssi_audit import audit
from wssi_audit.frontends import build_graph
from wssi_audit.report import Report


class Head(nn.Module):
    """Conv + BN + max-pool + dropout, then Linear + BatchNorm1d and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.relu(self.bn(self.conv(x))))
        h = self.drop(h.reshape(h.shape[0], -1))
        return self.out(F.relu(self.bn1(self.fc(h))))


def _round_trip(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


FORMS = {
    "export": lambda p: p,
    "saved and loaded": _round_trip,
    "core ATen": lambda p: p.run_decompositions(),
    "core ATen, saved and loaded": lambda p: _round_trip(p.run_decompositions()),
}


def _structure(report: Report) -> tuple:
    return (
        [chain.weights for chain in report.chains],
        [(b.shortcut, b.branch_weights, b.shortcut_weight) for b in report.residual_blocks],
        [layer.folded_bn for layer in report.layers],
        sorted(b.op for b in report.barriers),
    )


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    head = with_bn_statistics(Head(), (4, 1, 8, 8))
    return {"resnet_bn": example_model("resnet_bn"), "head": (head, torch.randn(4, 1, 8, 8))}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", ["resnet_bn", "head"])
def test_every_export_form_reads_as_symbolic_tracing_does(name: str, form: str) -> None:
    model, x = _models()[name]
    by_fx = audit(model, (x,), method="fx")
    program = FORMS[form](torch.export.export(model, (x,), strict=False))
    by_form = audit(program, (x,))
    assert by_form.trace.coverage == 1.0, by_form.trace.unanalyzed
    assert _structure(by_form) == _structure(by_fx)
    assert by_form.summary.all_verified is True
    assert by_form.summary.gradient.log10_frobenius_bound == pytest.approx(by_fx.summary.gradient.log10_frobenius_bound)
    # The folding is real: every BatchNorm (the head's BatchNorm1d after Linear too) is folded.
    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(layer.folded_bn is not None for layer in by_form.layers) == batch_norms > 0


def test_saved_program_has_the_node_count_of_the_traced_one() -> None:
    """Unused statistics outputs and value-preserving copies are no nodes: a round trip through
    a file changes nothing the report counts."""
    model, x = _models()["resnet_bn"]
    program = torch.export.export(model, (x,), strict=False)
    assert audit(_round_trip(program), (x,)).trace == audit(program, (x,)).trace


def test_a_used_statistics_output_is_a_barrier_not_an_activation() -> None:
    """max_pool2d_with_indices' indices, when something reads them, are no degree-1 activation."""

    class Unpool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Conv2d(1, 2, 3, padding=1)
            self.second = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled, indices = F.max_pool2d(self.first(x), 2, return_indices=True)
            return self.second(pooled) + indices.float()

    x = torch.randn(1, 1, 4, 4)
    graph = build_graph(torch.export.export(Unpool(), (x,), strict=False).run_decompositions(), (x,))
    side = [node for node in graph.nodes.values() if node.op == "side_output"]
    assert len(side) == 1
    pooled = next(node for node in graph.nodes.values() if node.op == "max_pool")
    assert side[0].inputs == [pooled.name]


class Wrapped(nn.Module):
    """autocast and no_grad blocks inside forward: torch.export writes them as subgraph ops."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            h = F.relu(self.a(x))
        with torch.no_grad():
            h = self.b(2.0 * h)
        return self.c(h)


def test_subgraph_ops_are_read_inside() -> None:
    """The chain runs through both blocks. Where torch writes them as subgraph ops (2.5 and
    later), the inlined nodes are no nodes of the module that runs: the self-check says it could
    not run them, never 'verified'."""
    x = torch.randn(3, 4)
    by_export = audit(Wrapped(), (x,), method="export")
    assert by_export.trace.coverage == 1.0, by_export.trace.unanalyzed
    assert [chain.layers for chain in by_export.chains] == [["a", "b", "c"]]
    program = torch.export.export(Wrapped(), (x,), strict=False)
    wrapped = any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in program.graph.nodes)
    assert by_export.summary.all_verified is (None if wrapped else True)
    assert [chain.verification for chain in by_export.chains] == (["not_run"] if wrapped else ["verified"])
