"""Every op class, in its functional, method and module forms, through both torch front-ends."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wssi_audit import audit
from wssi_audit.ops import OP_TABLE, Role


class Sandwich(nn.Module):
    """Linear -> op -> Linear: the op decides whether the two layers form one chain."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor] | nn.Module, width_after: int = 4) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.op = op
        self.second = nn.Linear(width_after, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.op(self.first(x)))


# (id, op, width after the op, input shape)
HOMOGENEOUS = [
    ("F.relu", F.relu, 4, (2, 4)),
    ("torch.relu", torch.relu, 4, (2, 4)),
    ("x.relu()", lambda x: x.relu(), 4, (2, 4)),
    ("F.leaky_relu", lambda x: F.leaky_relu(x, 0.2), 4, (2, 4)),
    ("nn.ReLU", nn.ReLU(), 4, (2, 4)),
    ("nn.LeakyReLU", nn.LeakyReLU(0.1), 4, (2, 4)),
    ("nn.PReLU", nn.PReLU(), 4, (2, 4)),
    ("nn.Dropout", nn.Dropout(0.5), 4, (2, 4)),
    ("nn.Identity", nn.Identity(), 4, (2, 4)),
    ("torch.flatten", lambda x: torch.flatten(x, 1), 12, (2, 3, 4)),
    ("x.view", lambda x: x.view(x.size(0), -1), 12, (2, 3, 4)),
    ("x.mean", lambda x: x.mean(dim=1), 4, (2, 3, 4)),
    ("scalar multiple", lambda x: 0.5 * x, 4, (2, 4)),
    ("x.permute", lambda x: x.permute(0, 2, 1).flatten(1), 12, (2, 3, 4)),
]

BARRIERS = [
    ("F.gelu", F.gelu, "gelu"),
    ("torch.sigmoid", torch.sigmoid, "sigmoid"),
    ("torch.tanh", torch.tanh, "tanh"),
    ("nn.ReLU6", nn.ReLU6(), "relu6|hardtanh"),  # export lowers ReLU6 to hardtanh
    ("F.silu", F.silu, "silu"),
    ("nn.LayerNorm", nn.LayerNorm(4), "layer_norm"),
    ("softmax", lambda x: F.softmax(x, dim=-1), "softmax"),
    ("gate", lambda x: x * torch.sigmoid(x), "mul"),
    ("offset", lambda x: x + 1.0, "add_const"),
]

METHODS = ["fx", "export"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("label", "op", "width", "shape"), HOMOGENEOUS, ids=[h[0] for h in HOMOGENEOUS])
def test_homogeneous_ops_join_layers_into_one_verified_chain(label, op, width, shape, method):
    torch.manual_seed(0)
    report = audit(Sandwich(op, width), (torch.randn(shape),), method=method)
    assert [c.layers for c in report.chains] == [["first", "second"]], label
    assert report.summary.all_verified is True
    assert report.barriers == []
    assert report.trace.coverage == 1.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("label", "op", "canonical"), BARRIERS, ids=[b[0] for b in BARRIERS])
def test_barriers_split_chains_and_give_a_reason(label, op, canonical, method):
    torch.manual_seed(0)
    report = audit(Sandwich(op), (torch.randn(2, 4),), method=method)
    assert [c.layers for c in report.chains] == [["first"], ["second"]], label
    ops = [b.op for b in report.barriers]
    assert set(canonical.split("|")) & set(ops), ops
    assert all(b.reason for b in report.barriers)
    assert report.summary.all_verified is True


class TwoWay(nn.Module):
    def __init__(self, join: str) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.left = nn.Linear(4, 4)
        self.right = nn.Linear(4, 4)
        self.last = nn.Linear(8 if join == "cat" else 4, 2)
        self.join = join

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.first(x))
        a, b = F.relu(self.left(h)), F.relu(self.right(h))
        joined = torch.cat([a, b], dim=1) if self.join == "cat" else a + b
        return self.last(joined)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("join", ["cat", "add"])
def test_chains_end_at_branch_points_and_joins(join, method):
    report = audit(TwoWay(join), (torch.randn(2, 4),), method=method)
    assert sorted(map(tuple, (c.layers for c in report.chains))) == [("first",), ("last",), ("left",), ("right",)]
    assert report.barriers == [] and report.trace.coverage == 1.0
    assert report.summary.gradient.log10_frobenius_bound is not None


class UnknownOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.cumsum(self.first(x), dim=1))


@pytest.mark.parametrize("method", METHODS)
def test_unknown_ops_are_listed_and_lower_coverage(method):
    report = audit(UnknownOp(), (torch.randn(2, 4),), method=method)
    assert report.trace.coverage < 1.0
    assert any("cumsum" in u.reason for u in report.trace.unanalyzed)
    assert [c.layers for c in report.chains] == [["first"], ["second"]]
    assert report.summary.gradient.log10_frobenius_bound is None


def test_op_table_is_consistent():
    for name, spec in OP_TABLE.items():
        if spec.role is Role.BARRIER:
            assert spec.reason, name
    from wssi_audit.frontends.fx_tables import ATEN_TABLE, FUNCTION_TABLE, METHOD_TABLE, MODULE_TABLE

    targets = [op for _, op in MODULE_TABLE] + list(FUNCTION_TABLE.values())
    targets += list(METHOD_TABLE.values()) + list(ATEN_TABLE.values())
    unknown = {op for op in targets if not op.startswith("@") and op not in OP_TABLE}
    assert unknown == {"bilinear"} or unknown == set(), unknown
