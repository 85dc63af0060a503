"""Every op class, in its functional, method and module forms, through both torch front-ends."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from wssi_audit import analyze, audit
from wssi_audit.analysis.weights import shift_layers
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
    # rows added for ops seen on real models (issue 11)
    ("unbind + torch.stack", lambda x: torch.stack(x.unbind(1), 1), 4, (2, 4)),
    ("torch.roll", lambda x: torch.roll(x, 1, 1), 4, (2, 4)),
    ("x.reshape_as", lambda x: x.reshape(2, 2, 2).reshape_as(x), 4, (2, 4)),
    ("x.swapaxes", lambda x: x.swapaxes(0, 1).swapaxes(0, 1), 4, (2, 4)),
    ("x.expand_as", lambda x: x[:, :1].expand_as(x), 4, (2, 4)),
    ("in-place dropout", lambda x: F.dropout(x, 0.1, False, inplace=True), 4, (2, 4)),
    ("torch.ones_like reads a shape", lambda x: x * torch.ones_like(x), 4, (2, 4)),
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
    ("F.normalize", lambda x: F.normalize(x, dim=-1), "normalize|div"),  # export: norm, clamp, div
    ("addcmul of activations", lambda x: torch.addcmul(x, x, x), "mul"),
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
def test_chains_run_through_a_split_that_joins_again_carrying_the_parallel_layers(join, method):
    """first -> (left, right) -> cat / add -> last: scaling `first` by g scales both branches,
    `last` undoes it; left and right keep their weights and scale their biases (carried)."""
    torch.manual_seed(0)
    model, x = TwoWay(join), torch.randn(2, 4)
    analysis = analyze(model, (x,), method=method)
    report = analysis.report
    assert sorted(map(tuple, (c.layers for c in report.chains))) == [("first", "last"), ("left",), ("right",)]
    first = analysis.structure.chains[0].layers[0]
    assert first.name == "first" and sorted(r.name for r in first.carried) == ["left", "right"]
    assert report.barriers == [] and report.trace.coverage == 1.0
    assert report.summary.all_verified is True
    assert report.summary.gradient.log10_frobenius_bound is not None
    # Independently: the shift through shift_layers leaves the output unchanged; without the
    # carried biases it does not.
    chain = analysis.structure.chains[0]
    reference = model(x).detach().double()
    shifted = shift_layers(chain.layers, [0.7, -0.7], analysis.graph.tensors)
    out = functional_call(model.double(), shifted, (x.double(),))
    assert torch.allclose(out, reference, rtol=1e-6, atol=1e-8)
    bare = {k: v for k, v in shifted.items() if not k.startswith(("left", "right"))}
    assert not torch.allclose(functional_call(model, bare, (x.double(),)), reference, rtol=1e-3, atol=1e-4)


class LeakyBranch(TwoWay):
    """As TwoWay, but the left branch is also an output: the split does not join again."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.first(x))
        a, b = F.relu(self.left(h)), F.relu(self.right(h))
        return self.last(a + b), a


@pytest.mark.parametrize("method", METHODS)
def test_chains_end_at_a_split_whose_paths_leave_separately(method):
    report = audit(LeakyBranch("add"), (torch.randn(2, 4),), method=method)
    assert sorted(map(tuple, (c.layers for c in report.chains))) == [("first",), ("last",), ("left",), ("right",)]
    assert report.summary.all_verified is True


class OutsideJoin(nn.Module):
    """A join that reads an activation from outside the split region: scales would not match."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.left = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)
        self.last = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.first(x))
        return self.last(F.relu(self.left(h)) + h + self.other(x))


@pytest.mark.parametrize("method", METHODS)
def test_a_join_with_an_input_from_outside_ends_the_chain(method):
    report = audit(OutsideJoin(), (torch.randn(2, 4),), method=method)
    assert all(len(c.layers) == 1 for c in report.chains)
    assert report.summary.all_verified is True


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
    from wssi_audit.frontends.fx_tables import ATEN_TABLE, FUNCTION_TABLE, METHOD_TABLE, MODULE_TABLE, QUALNAME_TABLE

    targets = [op for _, op in MODULE_TABLE] + list(FUNCTION_TABLE.values()) + list(QUALNAME_TABLE.values())
    targets += list(METHOD_TABLE.values()) + list(ATEN_TABLE.values())
    unknown = {op for op in targets if not op.startswith("@") and op not in OP_TABLE}
    assert unknown == {"bilinear"} or unknown == set(), unknown


class Affine(nn.Module):
    """timm's ResMLP Affine: addcmul(beta, alpha, x) = alpha * x + beta, between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.alpha = nn.Parameter(torch.full((4,), 2.0))
        self.beta = nn.Parameter(torch.full((4,), 0.5))
        self.second = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.addcmul(self.beta, self.alpha, self.first(x)))


@pytest.mark.parametrize("method", METHODS)
def test_addcmul_with_parameters_is_an_affine_barrier(method):
    report = audit(Affine(), (torch.randn(2, 4),), method=method)
    assert [c.layers for c in report.chains] == [["first"], ["second"]]
    assert [b.op for b in report.barriers] == ["addcmul"]


@pytest.mark.parametrize("method", METHODS)
def test_torchvision_stochastic_depth_is_identity_in_eval(method):
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(0)
    report = audit(Sandwich(ops.StochasticDepth(0.5, "row")), (torch.randn(2, 4),), method=method)
    assert [c.layers for c in report.chains] == [["first", "second"]]
    assert report.trace.coverage == 1.0 and report.summary.all_verified is True


class Padded(nn.Module):
    def __init__(self, pad: nn.Module) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 2, 3)
        self.pad = pad
        self.second = nn.Conv2d(2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.pad(self.first(x)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("pad", "homogeneous"),
    [
        (nn.ZeroPad2d(1), True),
        (nn.ReflectionPad2d(1), True),
        (nn.ReplicationPad2d(2), True),
        (nn.ConstantPad2d(1, 1.0), False),
    ],
    ids=["zero", "reflect", "replicate", "constant 1"],
)
def test_padding_modes(pad, homogeneous, method):
    """Reflect / replicate padding copies entries (degree 1, Lipschitz above 1); a non-zero
    constant is an offset."""
    torch.manual_seed(0)
    report = audit(Padded(pad), (torch.randn(1, 1, 6, 6),), method=method)
    assert [len(c.layers) for c in report.chains] == ([2] if homogeneous else [1, 1])
    assert report.trace.coverage == 1.0 and report.summary.all_verified is True


@pytest.mark.parametrize(
    ("mode", "pad", "shape"),
    [
        ("reflect", [1, 1, 1, 1], (1, 2, 3, 3)),
        ("replicate", [2, 1, 0, 2], (1, 2, 1, 4)),
        ("circular", [1, 1], (1, 1, 2)),
    ],
)
def test_padding_lipschitz_bounds_the_padding_map(mode, pad, shape):
    """The row's bound against the exact operator norm of the padding (a 0/1 matrix), built here."""
    size = math.prod(shape)
    columns = [
        F.pad(torch.eye(size, dtype=torch.float64)[i].reshape(shape), pad, mode=mode).flatten() for i in range(size)
    ]
    exact = float(torch.linalg.matrix_norm(torch.stack(columns, 1), ord=2))
    bound = OP_TABLE["pad"].lipschitz_of({"mode": mode, "pad": pad})
    assert exact <= bound + 1e-12
