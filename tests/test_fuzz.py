"""Differential fuzzing of the analyzer: random architectures, audited, then every claim checked by
an independent reference written here (its own weight scale shift, run through the real module).

Claims checked on each random network:
* every chain of 2+ layers the audit reports: a shift g_l (prod g_l = 1) of its layers, written
  into the real module's parameters by the formulas below, leaves the chain's end (the last layer's
  module output, or its folded BatchNorm's) and the model output unchanged;
* every reported barrier between two weight layers (an activation that is not positively
  homogeneous): shifting g across it (g on the layer before, 1/g on the layer after) changes the
  output;
* the certified input-gradient bound: at least the gradient norm an independent float64 power
  iteration (torch.func jvp/vjp through the real module) finds at the example input, and at most
  the paper's Frobenius bound (both the report's measured figure and this one stay below it);
* and the audit's own self-check reports no failed chain (its claims are true).

Normal suite: WSSI_FUZZ_EXAMPLES networks (default 30). The longer run recorded in
docs/reliability.md:  WSSI_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py -q -s
"""

from __future__ import annotations

import copy
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from wssi_audit import audit

EXAMPLES = int(os.environ.get("WSSI_FUZZ_EXAMPLES", "30"))
HOMOGENEOUS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1)}
NOT_HOMOGENEOUS = {"relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}
ACTIVATIONS = {**HOMOGENEOUS, **NOT_HOMOGENEOUS}
TOLERANCE = 1e-9
TALLY = {"networks": 0, "chain_claims": 0, "barrier_claims": 0, "bound_claims": 0}


# ------------------------------------------------------------------------------------- the networks
class Net(nn.Module):
    """A network built from a drawn program; the forward is static, so torch.fx traces it."""

    def __init__(self, program: list[tuple], channels: int, size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        # (layer before, its BatchNorm or None, activation, activation kind, layer after) for every
        # activation sitting directly between two weight layers: where a barrier is claimed or not.
        self.between: list[tuple[str, str | None, str, str, str]] = []
        self.kinds: dict[str, str] = {}  # activation module name -> its kind
        self.plan = self._build(program, channels, size)

    def _add(self, module: nn.Module) -> str:
        self.layers.append(module)
        return f"layers.{len(self.layers) - 1}"

    def _build(self, program: list[tuple], channels: int, size: int) -> list[tuple]:
        plan: list[tuple] = []
        flat = False
        program = [part for step in program for part in (step[1:] if step[0] == "layer" else [step])]
        last: str | None = None  # the last weight layer, when only BatchNorm / one activation followed
        since: list[tuple[str, str]] = []  # (kind, module name) of what followed it
        for step in program:
            kind = step[0]
            if kind == "weight":
                _, out, kernel, stride, bias = step
                if flat:
                    name = self._add(nn.Linear(channels, out, bias=bias))
                else:
                    stride = stride if size >= 4 else 1
                    name = self._add(nn.Conv2d(channels, out, kernel, stride=stride, padding=kernel // 2, bias=bias))
                    size = (size + 2 * (kernel // 2) - kernel) // stride + 1
                channels = out
                kinds = [k for k, _ in since]
                if last is not None and kinds in (["act"], ["bn", "act"]):
                    bn = since[0][1] if kinds[0] == "bn" else None
                    act_name = since[-1][1]
                    self.between.append((last, bn, act_name, self.kinds[act_name], name))
                plan.append(("module", name))
                last, since = name, []
                continue
            if kind == "act":
                name = self._add(ACTIVATIONS[step[1]]())
                self.kinds[name] = step[1]
                plan.append(("module", name))
                since.append(("act", name))
                continue
            if kind == "bn":
                name = self._add(nn.BatchNorm1d(channels) if flat else nn.BatchNorm2d(channels))
                plan.append(("module", name))
                since.append(("bn", name))
                continue
            last, since = None, []
            if kind == "flatten" and not flat:
                plan.append(("flatten",))
                channels, flat = channels * size * size, True
            elif kind == "pool" and not flat and size >= 2:
                plan.append(("module", self._add(nn.MaxPool2d(2) if step[1] == "max" else nn.AvgPool2d(2))))
                size //= 2
            elif kind == "residual":
                plan.append(("residual", self._branch(channels, step[1], flat)))
            elif kind == "cat" and not flat:
                a = self._branch(channels, step[1], flat, out=step[3])
                b = self._branch(channels, step[2], flat, out=step[4])
                plan.append(("cat", a, b))
                channels = step[3] + step[4]
            elif kind == "split" and not flat and channels % 2 == 0:
                half = channels // 2
                plan.append(("split", self._branch(half, step[1], flat), self._branch(half, step[2], flat)))
            elif kind == "tied":
                conv = self._add(nn.Linear(channels, channels) if flat else nn.Conv2d(channels, channels, 3, padding=1))
                plan.append(("tied", conv, self._add(ACTIVATIONS[step[1]]())))
        if not flat:
            plan.append(("flatten",))
            channels *= size * size
        plan.append(("module", self._add(nn.Linear(channels, 5))))
        return plan

    def _branch(self, channels: int, acts: list[str], flat: bool, out: int | None = None) -> list[str]:
        """weight -> act -> ... -> weight, keeping the shape (or ending at `out` channels)."""
        names = []
        for act in acts:
            names.append(
                self._add(nn.Linear(channels, channels) if flat else nn.Conv2d(channels, channels, 3, padding=1))
            )
            names.append(self._add(ACTIVATIONS[act]()))
            self.kinds[names[-1]] = act
        last = out or channels
        names.append(self._add(nn.Linear(channels, last) if flat else nn.Conv2d(channels, last, 1)))
        for i in range(1, len(names) - 1, 2):
            self.between.append((names[i - 1], None, names[i], self.kinds[names[i]], names[i + 1]))
        return names

    def _run(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.get_submodule(name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.plan:
            kind = step[0]
            if kind == "module":
                x = self.get_submodule(step[1])(x)
            elif kind == "flatten":
                x = torch.flatten(x, 1)
            elif kind == "residual":
                x = x + self._run(step[1], x)
            elif kind == "cat":
                x = torch.cat([self._run(step[1], x), self._run(step[2], x)], dim=1)
            elif kind == "split":
                a, b = torch.chunk(x, 2, dim=1)
                x = torch.cat([self._run(step[1], a), self._run(step[2], b)], dim=1)
            elif kind == "tied":
                conv, act = self.get_submodule(step[1]), self.get_submodule(step[2])
                x = conv(act(conv(x)))
        return x


activation = st.sampled_from(sorted(ACTIVATIONS))
weight = st.tuples(
    st.just("weight"), st.integers(3, 6), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.booleans()
)
layer = st.tuples(st.just("layer"), weight, st.tuples(st.just("act"), activation))
step = st.one_of(
    weight,
    layer,
    layer,
    st.tuples(st.just("layer"), st.tuples(st.just("bn")), st.tuples(st.just("act"), activation)),
    st.tuples(st.just("layer"), weight, st.tuples(st.just("bn")), st.tuples(st.just("act"), activation), weight),
    st.tuples(st.just("act"), activation),
    st.tuples(st.just("act"), st.sampled_from(sorted(HOMOGENEOUS))),
    st.tuples(st.just("bn")),
    st.tuples(st.just("pool"), st.sampled_from(["max", "avg"])),
    st.tuples(st.just("residual"), st.lists(activation, min_size=0, max_size=2)),
    st.tuples(
        st.just("cat"),
        st.lists(activation, max_size=1),
        st.lists(activation, max_size=1),
        st.integers(2, 4),
        st.integers(2, 4),
    ),
    st.tuples(st.just("split"), st.lists(activation, max_size=1), st.lists(activation, max_size=1)),
    st.tuples(st.just("tied"), activation),
    st.tuples(st.just("flatten")),
)
programs = st.lists(step, min_size=3, max_size=9)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
                module.weight.copy_(0.5 + torch.rand(module.num_features, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.num_features, generator=generator))
    return model.eval()


# ------------------------------------------------------------------------- the reference check
def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _shift(
    model: nn.Module,
    layers: list[tuple[str, str | None]],
    log10_g: list[float],
    carried: dict[str, list[tuple[str, str | None]]] | None = None,
) -> nn.Module:
    """A float64 copy with W_l -> g_l W_l and b_l -> c_l b_l (c_l = prod_{k<=l} g_k, science.md s.1).
    A layer with a folded BatchNorm keeps W, b and the statistics: its gamma and beta carry the shift,
    beta' = (c_l - g_l) a (b - mean) + c_l beta with a = gamma / sqrt(var + eps). The layers a chain
    layer carries (the report's `carried`: input and output both scaled by its c_l) keep W and scale
    b by c_l; with a folded BatchNorm, its running mean and beta scale by c_l."""
    shifted = copy.deepcopy(model).double()
    cumulative = 0.0
    with torch.no_grad():
        for position, ((name, bn_name), log_g) in enumerate(zip(layers, log10_g)):
            cumulative += log_g
            g = 10.0**log_g
            c = 1.0 if position == len(layers) - 1 else 10.0**cumulative
            for rider_name, rider_bn in (carried or {}).get(name, []):
                rider = _module(shifted, rider_name)
                if rider.bias is not None:
                    rider.bias.mul_(c)
                if rider_bn is not None:
                    _module(shifted, rider_bn).running_mean.mul_(c)
                    _module(shifted, rider_bn).bias.mul_(c)
            layer = _module(shifted, name)
            if bn_name is None:
                layer.weight.mul_(g)
                if layer.bias is not None:
                    layer.bias.mul_(c)
                continue
            bn = _module(shifted, bn_name)
            a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
            bn.bias.copy_((c - g) * a * (b - bn.running_mean) + c * bn.bias)
            bn.weight.mul_(g)
    return shifted


def _watched(model: nn.Module, x: torch.Tensor, watch: str, side: str = "output") -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's output, what module `watch` returned, or its first input with side="input")."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append((inputs[0] if side == "input" else out).detach().clone())

    handle = _module(model, watch).register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    return out, seen[-1]


def _log10_jacobian_norm(model: nn.Module, x: torch.Tensor, steps: int = 40) -> float:
    """log10 ||d model / d x||_2 from below: power iteration on J^T J (float64, jvp and vjp)."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sigma = 0.0
    _, pullback = torch.func.vjp(model, x)
    for _ in range(steps):
        v = v / v.norm()
        image = torch.func.jvp(model, (x,), (v,))[1].detach()
        sigma = float(image.norm())
        if sigma == 0.0:
            break
        v = pullback(image)[0]
    return math.log10(sigma) if sigma > 0 else -math.inf


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(a.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(program=programs, seed=st.integers(0, 2**16))
def test_random_architectures_make_no_false_claim(program: list[tuple], seed: int) -> None:
    torch.manual_seed(seed)
    model = _randomize(Net(program, 4, 8), seed)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    report = audit(model, (x,))
    assert not report.failed_chains, [(c.id, c.verification_reason) for c in report.failed_chains]
    reference = copy.deepcopy(model).double()
    x64 = x.double()
    layer_of = {layer.name: layer for layer in report.layers}
    rng = torch.Generator().manual_seed(seed + 1)
    for chain in report.chains:
        if len(chain.layers) < 2:
            continue
        pairs = [(name, layer_of[name].folded_bn) for name in chain.layers]
        draws = (torch.rand(len(pairs), generator=rng, dtype=torch.float64) * 2 - 1).tolist()
        factors = [d - sum(draws) / len(draws) for d in draws]
        end = pairs[-1][1] or pairs[-1][0]
        riders = {k: [(r, layer_of[r].folded_bn) for r in v] for k, v in chain.carried.items()}
        base_out, base_end = _watched(reference, x64, end)
        out, end_value = _watched(_shift(reference, pairs, factors, riders), x64, end)
        assert _relative(base_end, end_value) <= TOLERANCE, ("false chain", chain.layers, program)
        assert _relative(base_out, out) <= 1e-6, ("false chain at the output", chain.layers, program)
        TALLY["chain_claims"] += 1
    chain_of = {name: chain.id for chain in report.chains for name in chain.layers}
    reported = {b.node for b in report.barriers}
    for before, bn, act_name, op, after in model.between:
        if op not in NOT_HOMOGENEOUS or act_name not in reported:
            continue
        assert before not in chain_of or chain_of.get(before) != chain_of.get(after), (before, after)
        _, activation_input = _watched(reference, x64, act_name, side="input")
        if op == "relu6" and not bool((activation_input > 0).any()):
            continue  # dead on this input: homogeneous here, so no shift can tell
        # Watched at the layer after the barrier: downstream ops (a dead ReLU) may hide it from the output.
        _, base_after = _watched(reference, x64, after)
        moved = 0.0
        for decades in (3.0, -3.0):  # far enough to cross ReLU6's 6 for the activations seen
            shifted = _shift(reference, [(before, bn), (after, None)], [decades, -decades])
            moved = max(moved, _relative(base_after, _watched(shifted, x64, after)[1]))
        assert moved > 1e-6, ("a reported barrier is homogeneous after all", act_name, op, program)
        TALLY["barrier_claims"] += 1
    gradient = report.summary.gradient
    if gradient.log10_certified_bound is not None:
        certified = gradient.log10_certified_bound
        assert _log10_jacobian_norm(reference.eval(), x64) <= certified + 1e-9, ("certified bound below", program)
        assert gradient.log10_measured is None or gradient.log10_measured <= certified + 1e-6
        assert certified <= gradient.log10_frobenius_bound + 1e-9, ("certified above Frobenius", program)
        TALLY["bound_claims"] += 1
    TALLY["networks"] += 1


def test_zz_report_fuzz_counts() -> None:
    """Printed with -s, for docs/reliability.md; every network drawn was checked."""
    print(
        f"\nfuzz: {TALLY['networks']} random networks, {TALLY['chain_claims']} chain claims and "
        f"{TALLY['barrier_claims']} barrier claims and {TALLY['bound_claims']} certified bounds checked, 0 false"
    )
    assert math.isfinite(TALLY["networks"])
