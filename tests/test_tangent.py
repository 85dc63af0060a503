"""The tangent interpreter (frontends/fx_tangent.py) that computes the measured gradient's J w.

The claim: on every graph it accepts, its J w is the Jacobian of the function the runner
differentiates, applied to w: equal to torch.func.jvp's, and the transpose of autograd's backward
(u . (J w) = (J^T u) . w), conventions at ties included. Where it has no rule it declines and the
figure comes from autograd's double backward, unchanged; a wrong rule is caught by gradient.py's
adjoint check and the figure still comes out right.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from wssi_audit.analysis import gradient
from wssi_audit.analysis.gradient import measured_log10_gradient
from wssi_audit.frontends import build_graph, fx_tangent, graph_from_module
from wssi_audit.frontends.fx_runner import FxRunner
from wssi_audit.ir import Runner, flat_tensors


def _floats(value: object) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in flat_tensors(value) if t.is_floating_point()])


def _tangent_products(runner: Runner, seed: int = 0) -> None:
    """J w from the runner's linearization against torch.func.jvp, and against autograd's backward
    through the adjoint identity, for a random w and u."""
    function, inputs = runner.differentiable()
    found = runner.linearization(function, inputs)
    assert found is not None, "the interpreter declined"
    outputs, push = found
    x = inputs[0]
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape, generator=generator)
    image = torch.cat([t.reshape(-1) for t in push((w,))])
    primal, expected = torch.func.jvp(lambda v: function(v), (x,), (w,))
    expected = _floats(expected)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in outputs]), _floats(primal), rtol=1e-5, atol=0)
    scale = float(expected.abs().max())
    assert torch.allclose(image, expected, rtol=1e-4, atol=1e-5 * scale), float((image - expected).abs().max())
    leaf = x.detach().requires_grad_()
    output = _floats(function(leaf))
    u = torch.randn(output.shape, generator=generator)
    (pulled,) = torch.autograd.grad(output, leaf, u)
    left, right = float(u.double() @ image.double()), float(pulled.reshape(-1).double() @ w.reshape(-1).double())
    assert abs(left - right) <= 1e-4 * float(u.norm()) * float(image.norm()) + 1e-6 * abs(right)


def _statistics(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.2, 3.0, generator=generator)
            module.weight.data.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


class _Residual(nn.Module):
    def __init__(self, channels: int, in_place: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=in_place)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)) + x)


class _Dense(nn.Module):
    """DenseNet's join: the input and new features side by side."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, growth, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


BLOCKS = ["conv", "bn", "relu", "relu_", "leaky", "relu6", "hardtanh", "max", "avg", "residual", "dense", "pad"]


def _random_network(seed: int, blocks: list[str], head: str) -> tuple[nn.Module, torch.Tensor]:
    """A small network of the layers the interpreter has rules for, channels and sizes tracked."""
    torch.manual_seed(seed)
    channels, size = 2, 8
    layers: list[nn.Module] = []
    for block in blocks:
        if block == "conv":
            layers.append(nn.Conv2d(channels, channels + 1, 3, padding=1, bias=seed % 2 == 0))
            channels += 1
        elif block == "bn":
            layers.append(nn.BatchNorm2d(channels))
        elif block in ("relu", "relu_"):
            # in place only where autograd allows it: not into the input, not into a result its backward reads
            writable = bool(layers) and isinstance(layers[-1], (nn.Conv2d, nn.BatchNorm2d))
            layers.append(nn.ReLU(inplace=block == "relu_" and writable))
        elif block == "leaky":
            layers.append(nn.LeakyReLU(0.1))
        elif block == "relu6":
            layers.append(nn.ReLU6())
        elif block == "hardtanh":
            layers.append(nn.Hardtanh(-0.5, 0.5))
        elif block == "max" and size >= 2:
            layers.append(nn.MaxPool2d(2) if size % 2 == 0 else nn.MaxPool2d(3, 1, 1))
            size = size // 2 if size % 2 == 0 else size
        elif block == "avg" and size >= 2:
            layers.append(nn.AvgPool2d(2, ceil_mode=True))
            size = (size + 1) // 2
        elif block == "residual":
            layers.append(_Residual(channels, in_place=seed % 3 == 0))
        elif block == "dense":
            layers.append(_Dense(channels, 2))
            channels += 2
        elif block == "pad":
            layers.append(nn.ZeroPad2d(1))
            size += 2
    if head == "avg":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(channels, 3)]
    elif head == "max":
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels, 3)]
    else:
        layers += [nn.Flatten(), nn.Linear(channels * size * size, 3)]
    model = _statistics(nn.Sequential(*layers), seed)
    return model, torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


NETWORKS = dict(
    seed=st.integers(0, 10_000),
    blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=7),
    head=st.sampled_from(["avg", "max", "flat"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**NETWORKS)
def test_tangent_products_of_random_symbolic_traces_are_jvp_and_the_backwards_transpose(
    seed: int, blocks: list[str], head: str
) -> None:
    model, x = _random_network(seed, blocks, head)
    graph = graph_from_module(model, (x,), method="fx")
    assert graph.method == "fx"
    _tangent_products(graph.runner, seed)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**NETWORKS)
def test_tangent_products_of_random_exported_programs_are_jvp_and_the_backwards_transpose(
    seed: int, blocks: list[str], head: str
) -> None:
    model, x = _random_network(seed, blocks, head)
    _tangent_products(graph_from_module(model, (x,), method="export").runner, seed)


class _Functional(nn.Module):
    """Functions and Tensor methods rather than modules (a symbolic trace records them as such)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.bias = nn.Parameter(torch.randn(4))
        self.matrix = nn.Parameter(torch.randn(32, 5))
        self.offset = nn.Parameter(torch.randn(5))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, padding=1)
        y = F.batch_norm(y, self.mean, self.var, None, None, False, 0.1, 1e-5)
        y = F.max_pool2d(F.relu(y), 2)
        y = torch.clamp(y, -1.0, 1.5) * 0.5 - y / 3 + F.leaky_relu(y, 0.2)
        y = F.pad(y, (1, 1, 0, 0)).view(1, 4, -1)[:, :, :4]
        z = torch.cat([y, -y.permute(0, 1, 2).contiguous()], 2).flatten(1)
        z = torch.addmm(self.offset, z, self.matrix) + torch.matmul(z, self.matrix)
        rectified = (z * 1.0).relu_()
        return torch.stack([rectified, z.mean(1, keepdim=True).expand(1, 5)], 0).sum(0) + 1.0


@pytest.mark.parametrize("method", ["fx", "export"])
def test_functions_and_methods_have_rules_too(method: str) -> None:
    torch.manual_seed(0)
    model = _Functional().eval()
    graph = graph_from_module(model, (torch.randn(1, 2, 8, 8),), method=method)
    _tangent_products(graph.runner)


class _Kinks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(x, 2) + F.max_pool2d(x, 3, 1, 1).mean()
        pieces = [torch.relu(x), torch.clamp(x, 0.0, 1.0), torch.clamp_min(x, 1.0), F.hardtanh(x, -1.0, 1.0)]
        return torch.cat([p.flatten() for p in [*pieces, F.leaky_relu(x, 0.1), pooled]])


@pytest.mark.parametrize("method", ["fx", "export"])
def test_conventions_at_ties_are_autograds(method: str) -> None:
    """Inputs exactly at the kinks (relu at 0, clamp and hardtanh at their bounds, max-pool windows
    of equal values): the tangent product equals the dense Jacobian that autograd's reverse mode
    builds, so it is that backward's transpose even where one-sided derivatives disagree."""
    x = torch.tensor([[-1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 2.0], [1.0, 1.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    x = x.reshape(1, 1, 4, 4)
    runner = graph_from_module(_Kinks(), (x,), method=method).runner
    function, inputs = runner.differentiable()
    found = runner.linearization(function, inputs)
    assert found is not None
    jacobian = torch.autograd.functional.jacobian(lambda v: _floats(function(v)), inputs[0]).reshape(-1, 16)
    columns = torch.stack([found[1]((e.reshape(x.shape),))[0] for e in torch.eye(16)], 1)
    assert torch.equal(columns, jacobian)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "method", "size"),
    [
        ("resnet18", "fx", 32),
        ("resnet18", "export", 32),
        ("densenet121", "fx", 32),
        ("mobilenet_v2", "export", 32),
        ("vgg11_bn", "fx", 32),
    ],
)
def test_torchvision_models_tangent_products(name: str, method: str, size: int) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _statistics(getattr(torchvision.models, name)(num_classes=10), 0)
    graph = graph_from_module(model, (torch.randn(1, 3, size, size),), method=method)
    assert graph.method == method
    _tangent_products(graph.runner)


def _without_tangents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FxRunner, "linearization", lambda self, function, inputs: None)


def _tangent_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the J w products the tangent pass computed and autograd accepted."""
    used: list[int] = []
    push = gradient._Products.push

    def counted(self: gradient._Products, direction: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.tangent is not None:
            used.append(1)
        return push(self, direction)

    monkeypatch.setattr(gradient._Products, "push", counted)
    return used


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_resnets_figure_is_the_same_with_and_without_the_tangent_pass(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _statistics(torchvision.models.resnet18(num_classes=10), 1)
    runner = graph_from_module(model, (torch.randn(1, 3, 32, 32),), method=method).runner
    used = _tangent_steps(monkeypatch)
    measured, note, method_text = measured_log10_gradient(runner)
    assert measured is not None, note
    assert len(used) == 3  # every product came from the tangent pass
    with monkeypatch.context() as patch:
        _without_tangents(patch)
        before, _, before_text = measured_log10_gradient(runner)
    assert before is not None and abs(10 ** (measured - before) - 1) < 1e-6
    assert method_text == before_text


@pytest.mark.parametrize("layer", [nn.GELU(), nn.LayerNorm([4, 6, 6])])
def test_an_op_without_a_rule_is_measured_by_double_backward_as_before(
    layer: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), layer, nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)).eval()
    x = torch.randn(1, 2, 6, 6)
    runner = build_graph(model, (x,)).runner
    function, inputs = runner.differentiable()
    assert runner.linearization(function, inputs) is None
    used = _tangent_steps(monkeypatch)
    measured, note, _ = measured_log10_gradient(runner, steps=6)
    assert measured is not None, note
    assert not used
    with monkeypatch.context() as patch:
        _without_tangents(patch)
        before, _, _ = measured_log10_gradient(runner, steps=6)
    assert measured == before
    jacobian = torch.autograd.functional.jacobian(lambda v: model.double()(v), x.double()).reshape(5, -1)
    model.float()
    assert abs(measured - math.log10(float(torch.linalg.matrix_norm(jacobian, 2)))) < 1e-5


def _small_resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), _Residual(4, in_place=False), nn.Flatten()
    )
    model.append(nn.Linear(4 * 6 * 6, 5))
    return _statistics(model, 2), torch.randn(1, 2, 6, 6)


def test_a_wrong_tangent_rule_is_caught_by_the_adjoint_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: a ReLU rule without its mask (J w no longer the backward's transpose) fails the
    adjoint check on the first product, and the figure comes from the double backward, right; with
    the check removed the same wrong rule would have given a wrong figure."""
    model, x = _small_resnet()
    runner = build_graph(model, (x,)).runner
    right, _, _ = measured_log10_gradient(runner, steps=5)
    monkeypatch.setattr(fx_tangent._Mask, "__call__", lambda self, tangents: tangents[self.source])
    fell_back: list[int] = []
    fall_back = gradient._Products.fall_back

    def counted(self: gradient._Products) -> bool:
        fell_back.append(1)
        return fall_back(self)

    monkeypatch.setattr(gradient._Products, "fall_back", counted)
    measured, note, _ = measured_log10_gradient(runner, steps=5)
    assert measured is not None, note
    assert fell_back == [1]  # once, at the first product; the double backward's products all passed
    assert abs(measured - right) < 1e-6
    monkeypatch.setattr(gradient, "_adjoint", lambda *args: True)
    unguarded, _, _ = measured_log10_gradient(runner, steps=5)
    assert unguarded is not None and abs(unguarded - right) > 1e-3


def test_one_forward_serves_the_backward_and_the_tangent_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pullbacks differentiate the linearization's own outputs: the model is not called a second
    time, and the figure is the one autograd alone gives."""
    model, x = _small_resnet()
    runner = build_graph(model, (x,)).runner
    calls: list[int] = []
    call = torch.fx.GraphModule.__call__

    def counted(self: torch.fx.GraphModule, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.GraphModule, "__call__", counted)
    used = _tangent_steps(monkeypatch)
    measured, note, _ = measured_log10_gradient(runner, steps=5)
    assert measured is not None, note
    assert len(used) == 5 and not calls
    with monkeypatch.context() as patch:
        _without_tangents(patch)
        before, _, _ = measured_log10_gradient(runner, steps=5)
    assert calls and before is not None and abs(10 ** (measured - before) - 1) < 1e-6


def test_the_steps_hold_no_autograd_graph() -> None:
    """Values a step keeps (ReLU's result, a result's shape for broadcasting) are detached: the
    linearization, run on inputs that require grad, keeps no part of autograd's graph alive."""
    model, x = _small_resnet()
    gm = torch.fx.symbolic_trace(model)
    leaf = x.clone().requires_grad_()
    with torch.enable_grad():
        found = fx_tangent.linearize(gm, (leaf,))
    assert found is not None and all(t.requires_grad for t in found.outputs)
    held: list[object] = []
    for _, step, _, _ in found.steps:
        held.extend(vars(step).values() if isinstance(step, fx_tangent._Mask) else [])
        held.extend(cell.cell_contents for cell in getattr(step, "__closure__", None) or ())
    tensors = [t for t in held if torch.is_tensor(t)]
    assert any(isinstance(step, fx_tangent._Mask) for _, step, _, _ in found.steps) and tensors
    assert not [t for t in tensors if t.grad_fn is not None]


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return torch.relu(self.conv(x)) * scale


def test_a_placeholders_default_is_used_as_the_module_uses_it() -> None:
    torch.manual_seed(0)
    gm, x = torch.fx.symbolic_trace(_Scaled()), torch.randn(1, 2, 5, 5)
    found = fx_tangent.linearize(gm, (x,))
    assert found is not None
    w = torch.randn_like(x)
    primal, expected = torch.func.jvp(lambda v: gm(v), (x,), (w,))
    torch.testing.assert_close(found.outputs[0], primal)
    torch.testing.assert_close(found.push((w,))[0], expected)
    two_inputs = torch.fx.symbolic_trace(lambda a, b: torch.relu(a) + b)
    assert fx_tangent.linearize(two_inputs, (x,)) is None, "an input with no value and no default"


def test_hooks_on_the_module_decline() -> None:
    """A hook changes what calling the module computes, which the graph alone does not: the
    linearization's outputs are what the backward differentiates, so it declines. (The runner's
    copies drop the source's hooks; this guards any other caller.)"""
    model, x = _small_resnet()
    gm = torch.fx.symbolic_trace(model)
    assert fx_tangent.linearize(gm, (x,)) is not None
    handle = gm.register_forward_hook(lambda module, args, output: output * 3)
    assert fx_tangent.linearize(gm, (x,)) is None
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    try:
        assert fx_tangent.linearize(gm, (x,)) is None
    finally:
        handle.remove()
    assert fx_tangent.linearize(gm, (x,)) is not None


def test_the_float32_copy_is_made_once_only_where_nothing_writes() -> None:
    model, x = _small_resnet()
    runner = graph_from_module(model, (x,), method="export").runner  # ATen ops: writes removable
    assert runner.differentiable()[0] is runner.differentiable()[0]
    traced = build_graph(model, (x,)).runner  # module calls may write
    assert traced.differentiable()[0] is not traced.differentiable()[0]
    writing = FxRunner(torch.fx.symbolic_trace(_WriteAfterRead().eval()), (torch.randn(1, 2, 5, 5),))
    assert writing.differentiable()[0] is not writing.differentiable()[0]


class _WriteAfterRead(nn.Module):
    """relu_ writes into `a`, which is read again afterwards: a + relu_(a) is 2 relu(a), and an
    out-of-place relu would make it a + relu(a)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        b = a.relu_()
        return (a + b).flatten()


class _WriteIntoView(nn.Module):
    """A view of `a` made before the write sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        view = a.view(-1)
        a.relu_()
        return view * 2


class _WriteIntoReLU(nn.Module):
    """y = relu(a); y += b in place: ReLU's tangent reads its result, which the write changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = y.add_(x.mean() - 0.5)
        return y.flatten()


class _WriteAfterConv(nn.Module):
    """conv -> add_ -> mul_ -> relu_: writes no other node sees, as torchvision's in-place ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y.add_(x.mean() - 0.5)
        y = y.mul_(2.0)
        return F.relu(y, inplace=True).flatten()


@pytest.mark.parametrize("module", [_WriteAfterRead, _WriteIntoView])
def test_in_place_writes_that_other_readers_see_decline(module: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, x = module().eval(), torch.randn(1, 2, 5, 5)
    runner = graph_from_module(model, (x,), method="fx").runner
    function, inputs = runner.differentiable()
    assert runner.linearization(function, inputs) is None
    exact = torch.autograd.functional.jacobian(lambda v: _floats(model(v.clone())), x).reshape(-1, x.numel())
    measured, note, _ = measured_log10_gradient(runner, steps=8)
    assert measured is not None, note
    assert measured <= math.log10(float(torch.linalg.matrix_norm(exact.double(), 2))) + 1e-5


def test_in_place_writes_no_other_node_sees_are_followed() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5)
    _tangent_products(graph_from_module(_WriteAfterConv().eval(), (x,), method="fx").runner)


def test_a_write_into_relus_result_declines() -> None:
    """ReLU's step reads its result at every product: a later in-place write would change it."""
    torch.manual_seed(0)
    model, x = _WriteIntoReLU().eval(), torch.randn(1, 2, 5, 5)
    assert fx_tangent.linearize(torch.fx.symbolic_trace(model), (x,)) is None


class _Standardized(nn.Conv2d):
    """A Conv2d subclass whose forward is not Conv2d's: matched by type it would get Conv2d's rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * 2, self.bias, padding=1)


def test_modules_are_matched_by_exact_type_and_eval_mode() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5)

    class Leaves(torch.fx.Tracer):  # keeps the subclass a call_module node, as a trace with leaves does
        def is_leaf_module(self, module: nn.Module, name: str) -> bool:
            return isinstance(module, _Standardized) or super().is_leaf_module(module, name)

    model = nn.Sequential(_Standardized(2, 2, 3), nn.Flatten())
    subclass = torch.fx.GraphModule(model, Leaves().trace(model))
    assert fx_tangent.linearize(subclass, (x,)) is None
    training = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)).train())
    assert fx_tangent.linearize(training, (x,)) is None
    dropout = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Dropout()).train())
    assert fx_tangent.linearize(dropout, (x,)) is None
    assert fx_tangent.linearize(dropout.eval(), (x,)) is not None
