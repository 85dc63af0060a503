"""The invariant regularizer: invariance, closed-form gradients, attach() and coverage."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import wssi_audit
from wssi_audit.analysis.verify import random_log10_factors
from wssi_audit.analysis.weights import shift_layers
from wssi_audit.models import INPUT_SHAPES, create_model
from wssi_audit.regularizer import DEFAULT_FORM, DEFAULT_STRENGTH, FORMS, WeightScaleRegularizer, attach

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial biases and BatchNorm statistics, so folding and bias shifts are really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(0.2 * torch.randn(module.num_features, generator=generator))
            elif isinstance(module, nn.Linear | nn.Conv2d) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


def _build(name: str, seed: int, **kwargs: object) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = _randomize(create_model(name, **kwargs), seed).double().eval()
    x = torch.randn(INPUT_SHAPES[name], generator=torch.Generator().manual_seed(seed)).double()
    return model, x


def _shift_all_chains(reg: WeightScaleRegularizer, model: nn.Module, seed: int, decades: float) -> None:
    """A random function-preserving shift inside every chain (and residual branch) of the model."""
    rng = random.Random(seed)
    state = model.state_dict()
    for chain in reg.analysis.structure.chains:
        if len(chain.layers) > 1:
            factors = random_log10_factors(len(chain.layers), rng, decades)
            for key, value in shift_layers(chain.layers, factors, state).items():
                state[key].copy_(value)


def _weight_decay(model: nn.Module) -> float:
    return float(sum(p.detach().square().sum() for p in model.parameters()))


def _all_terms(name: str, form: str) -> dict[str, object]:
    return {"strength": 0.1, "form": form, "direction_strength": 0.03, "bias_strength": 0.02}


@SETTINGS
@given(seed=st.integers(0, 10_000), form=st.sampled_from(FORMS), name=st.sampled_from(["mlp", "cnn", "cnn_bn"]))
def test_penalty_invariant_to_shifts_in_plain_chains(seed: int, form: str, name: str) -> None:
    model, x = _build("cnn", seed, batch_norm=True) if name == "cnn_bn" else _build(name, seed)
    reg = WeightScaleRegularizer(model, x, **_all_terms(name, form))
    before, logits, decay = reg.penalty().item(), model(x), _weight_decay(model)
    _shift_all_chains(reg, model, seed, decades=1.0)
    after = reg.penalty().item()
    assert torch.allclose(model(x), logits, rtol=1e-9, atol=1e-9)  # really function-preserving
    assert after == pytest.approx(before, rel=1e-9)
    assert abs(_weight_decay(model) - decay) > 1e-3 * decay  # while weight decay's penalty moves


def _rescale_stream(model: nn.Module, factor: float) -> None:
    """Scale the residual stream of a BN-free SmallResNet by `factor`: stem (weight, bias) and every
    bias inside the blocks up, the head's weight down. The function is unchanged."""
    with torch.no_grad():
        model.stem.weight.mul_(factor)
        model.stem.bias.mul_(factor)
        for name, p in model.layers.named_parameters():
            if name.endswith("bias"):
                p.mul_(factor)
        model.fc.weight.div_(factor)


@SETTINGS
@given(seed=st.integers(0, 10_000), form=st.sampled_from(FORMS), stream=st.floats(-1.5, 1.5))
def test_penalty_invariant_in_residual_networks(seed: int, form: str, stream: float) -> None:
    model, x = _build("resnet_nobn", seed)
    reg = WeightScaleRegularizer(model, x, strength=0.1, form=form, direction_strength=0.03, bias_strength=0.02)
    assert [t.kind for t in reg._terms].count("block") == 4
    before, logits, decay = reg.penalty().item(), model(x), _weight_decay(model)
    _shift_all_chains(reg, model, seed, decades=1.0)
    _rescale_stream(model, 10.0**stream)
    assert torch.allclose(model(x), logits, rtol=1e-8, atol=1e-9)
    assert reg.penalty().item() == pytest.approx(before, rel=1e-9)
    assert abs(_weight_decay(model) - decay) > 1e-4 * decay


@SETTINGS
@given(seed=st.integers(0, 10_000), form=st.sampled_from(FORMS))
def test_penalty_invariant_with_folded_batchnorm_residual(seed: int, form: str) -> None:
    model, x = _build("resnet_bn", seed)
    reg = WeightScaleRegularizer(model, x, strength=0.1, form=form, direction_strength=0.03, bias_strength=0.02)
    before, logits = reg.penalty().item(), model(x)
    _shift_all_chains(reg, model, seed, decades=1.0)
    assert torch.allclose(model(x), logits, rtol=1e-8, atol=1e-9)
    assert reg.penalty().item() == pytest.approx(before, rel=1e-9)
    # Rescaling a raw conv weight that feeds a BatchNorm (with its running variance following, as training
    # would) changes nothing either: that weight's scale is not identifiable.
    with torch.no_grad():
        model.layers[0].conv1.weight.mul_(7.0)
        model.layers[0].bn1.running_var.mul_(49.0)
        model.layers[0].bn1.running_mean.mul_(7.0)
    assert reg.penalty().item() == pytest.approx(before, rel=1e-6)


def test_log_form_is_log_of_the_input_gradient_bound_terms() -> None:
    """Residual log form = log||W_in|| + log||W_out|| + sum_b log(||s_b|| + prod_j ||V_bj||)."""
    model, x = _build("resnet_nobn", 3)
    reg = WeightScaleRegularizer(model, x, strength=1.0, form="log")
    n = {name: float(m.weight.detach().norm()) for name, m in model.named_modules() if hasattr(m, "weight")}
    import math

    expected = math.log(n["stem"]) + math.log(n["fc"])
    for index in range(4):
        block = f"layers.{index}"
        shortcut = n.get(f"{block}.downsample.0", 1.0)
        expected += math.log(shortcut + n[f"{block}.conv1"] * n[f"{block}.conv2"])
    assert reg.penalty().item() == pytest.approx(expected, rel=1e-12)


def test_balanced_form_is_bounded_and_matches_weight_decay_at_balance() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[2].weight.fill_(0.5)  # both norms equal (= 2): the balanced point
    reg = WeightScaleRegularizer(model, torch.randn(1, 4).double(), strength=1.0, form="balanced")
    assert reg.penalty().item() == pytest.approx(_weight_decay(model))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[2].weight.mul_(1e-3)
    assert reg.penalty().item() > 0


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet_bn", "resnet_nobn"])
@pytest.mark.parametrize("form", FORMS)
def test_closed_form_gradient_matches_autograd(name: str, form: str) -> None:
    model, x = _build(name, 1)
    model.train()
    reg = WeightScaleRegularizer(model, x, strength=0.1, form=form, direction_strength=0.03, bias_strength=0.02)
    params = list(model.parameters())
    expected = torch.autograd.grad(reg.penalty(), params, allow_unused=True)
    reg.add_gradients_()
    for p, g in zip(params, expected):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        want = g if g is not None else torch.zeros_like(p)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    # The raw conv weights feeding a BatchNorm get no gradient from the penalty.
    if name == "resnet_bn":
        assert model.layers[0].conv1.weight.grad is None or not model.layers[0].conv1.weight.grad.any()
        assert model.layers[0].bn1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("form", FORMS)
def test_update_has_no_component_along_the_shift_orbit(form: str) -> None:
    """E_l = <dJ/dW_l, W_l> + sum_{k>=l} <dJ/db_k, b_k> is equal across a chain (science.md s.3)."""
    model, x = _build("mlp", 5, depth=5)
    reg = WeightScaleRegularizer(model, x, strength=0.1, form=form, direction_strength=0.05, bias_strength=0.05)
    reg.add_gradients_()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    bias_terms = [float((m.bias.grad * m.bias.detach()).sum()) for m in linears]
    energies = [float((m.weight.grad * m.weight.detach()).sum()) + sum(bias_terms[i:]) for i, m in enumerate(linears)]
    assert max(energies) - min(energies) < 1e-9 * max(abs(e) for e in energies)
    # Weight decay's E_l = 2 ||W_l||^2 differs across layers: it does push along the orbit.
    decay = [2 * float(m.weight.detach().square().sum()) for m in linears]
    assert max(decay) - min(decay) > 1e-3


def _step_pair(name: str, optimizer_cls: type, **opt: object) -> tuple[nn.Module, nn.Module]:
    model, x = _build(name, 2)
    model.train()
    twin = copy.deepcopy(model)
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    first = optimizer_cls(model.parameters(), **opt)
    handle = attach(model, first, strength=0.05, form="balanced", example_inputs=x, bias_strength=0.01)
    reg = WeightScaleRegularizer(twin, x, strength=0.05, form="balanced", bias_strength=0.01)
    covered = {id(p) for p in reg.covered_parameters()}
    second = optimizer_cls(
        [
            {"params": [p for p in twin.parameters() if id(p) not in covered]},
            {"params": [p for p in twin.parameters() if id(p) in covered], "weight_decay": 0.0},
        ],
        **opt,
    )
    for _ in range(3):
        first.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        first.step()
        second.zero_grad()
        (nn.functional.cross_entropy(twin(x), y) + reg.penalty()).backward()
        second.step()
    handle.remove()
    assert len(first.param_groups) == 1 and len(first.param_groups[0]["params"]) == len(list(model.parameters()))
    return model, twin


@pytest.mark.parametrize("name", ["mlp", "resnet_bn"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_attach_and_penalty_in_loss_give_the_same_update(name: str, optimizer: str) -> None:
    if optimizer == "sgd":
        model, twin = _step_pair(name, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        model, twin = _step_pair(name, torch.optim.AdamW, lr=1e-2, weight_decay=1e-2)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), key


def test_attach_moves_only_covered_parameters_to_no_decay() -> None:
    model, x = _build("resnet_bn", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
    handle = wssi_audit.attach(model, optimizer, example_inputs=x)
    assert handle.regularizer.strength == DEFAULT_STRENGTH and handle.regularizer.form == DEFAULT_FORM
    decayed, free = optimizer.param_groups
    assert free["weight_decay"] == 0.0 and decayed["weight_decay"] == 5e-4
    free_ids = {id(p) for p in free["params"]}
    assert id(model.layers[0].bn1.weight) in free_ids and id(model.fc.weight) in free_ids
    assert id(model.layers[0].conv1.weight) not in free_ids  # scale-free in train mode: keeps its decay
    handle.remove()
    handle.remove()  # idempotent
    assert len(optimizer.param_groups) == 1


def test_coverage_lists_exclusions_with_reasons() -> None:
    model, x = _build("resnet_bn", 0)
    coverage = WeightScaleRegularizer(model, x).coverage()
    carriers = {c.carrier for c in coverage.covered}
    assert "layers.0.bn1.weight" in carriers and "fc.weight" in carriers
    reasons = {e.key: e.reason for e in coverage.excluded}
    assert "BatchNorm" in reasons["layers.0.conv1.weight"]
    assert "covered" in str(coverage)

    transformer, tx = _build("transformer_block", 0)
    coverage = WeightScaleRegularizer(transformer, tx).coverage()
    assert not coverage.covered and len(coverage.excluded) == 6
    assert WeightScaleRegularizer(transformer, tx).penalty().item() == 0.0


def test_chain_feeding_layer_norm_is_excluded() -> None:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    reg = WeightScaleRegularizer(model, torch.randn(2, 8))
    covered = {c.weight for c in reg.coverage().covered}
    assert covered == {"4.weight", "6.weight"}
    reasons = {e.key: e.reason for e in reg.coverage().excluded}
    assert "normalization" in reasons["0.weight"] and "normalization" in reasons["2.weight"]


def test_analysis_keeps_training_mode_and_from_analysis() -> None:
    model, x = _build("cnn", 0, batch_norm=True)
    model.train()
    reg = WeightScaleRegularizer(model, x)
    assert model.training and all(m.training for m in model.modules())
    again = WeightScaleRegularizer.from_analysis(reg.analysis, model, form="balanced")
    assert again.form == "balanced" and len(again.coverage().covered) == len(reg.coverage().covered)


def test_collapsed_layer_is_clamped_not_nan() -> None:
    model, x = _build("mlp", 0)
    reg = WeightScaleRegularizer(model, x, strength=0.1)
    with torch.no_grad():
        model[1].weight.zero_()
    assert torch.isfinite(reg.penalty())
    reg.add_gradients_()
    assert torch.isfinite(model[1].weight.grad).all() and not model[1].weight.grad.any()


def test_bad_options() -> None:
    model, x = _build("mlp", 0)
    with pytest.raises(ValueError, match="form"):
        WeightScaleRegularizer(model, x, form="cubic")
    with pytest.raises(ValueError, match=">= 0"):
        WeightScaleRegularizer(model, x, strength=-1.0)


def test_float32_autocast_and_compile() -> None:
    torch.manual_seed(0)
    model = create_model("cnn", batch_norm=True)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    handle = attach(model, optimizer, strength=0.01, example_inputs=x[:2])
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(compiled(x).float(), y)
            penalty = handle.penalty()
        assert penalty.dtype == torch.float32
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    compiled_penalty = torch.compile(handle.regularizer.penalty, backend="aot_eager")
    assert compiled_penalty().item() == pytest.approx(handle.penalty().item(), rel=1e-6)
    # Built from the compiled wrapper, it reaches the same parameters.
    wrapped = WeightScaleRegularizer(compiled, x[:2]).covered_parameters()
    assert {id(p) for p in wrapped} == {id(p) for p in handle.regularizer.covered_parameters()}


def test_distributed_data_parallel(tmp_path: object) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, x = _build("mlp", 0)
        twin = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        attach(ddp, optimizer, strength=0.1)
        reg = WeightScaleRegularizer(twin, x, strength=0.1)
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        y = torch.randint(0, 10, (x.shape[0],))
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        twin_opt.zero_grad()
        (nn.functional.cross_entropy(twin(x), y) + reg.penalty()).backward()
        twin_opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    model, x = _build("resnet_bn", 0)
    reg = WeightScaleRegularizer(model, x, form="balanced")
    cpu_value = reg.penalty().item()
    model.float().cuda()
    assert reg.penalty().item() == pytest.approx(cpu_value, rel=1e-5)
    reg.add_gradients_()
    assert model.fc.weight.grad.is_cuda


def test_frozen_layers_are_excluded() -> None:
    model, x = _build("mlp", 0)
    model[1].weight.requires_grad_(False)
    reg = WeightScaleRegularizer(model, x)
    assert not reg.coverage().covered
    assert any("frozen" in e.reason for e in reg.coverage().excluded)


@pytest.mark.parametrize("name", ["resnet_nobn", "resnet_bn"])
@pytest.mark.parametrize("form", FORMS)
def test_no_update_along_shifts_inside_residual_branches(name: str, form: str) -> None:
    """Inside every branch, <dJ/dcarrier, carrier> (weight, or BN gamma) is the same for both layers."""
    model, x = _build(name, 4)
    reg = WeightScaleRegularizer(model, x, strength=0.1, form=form)
    reg.add_gradients_()
    for block in model.layers:
        carriers = [block.conv1, block.conv2] if name == "resnet_nobn" else [block.bn1, block.bn2]
        energies = [float((m.weight.grad * m.weight.detach()).sum()) for m in carriers]
        assert energies[0] == pytest.approx(energies[1], rel=1e-9)
        assert energies[0] > 0


def test_attach_only_touches_parameters_the_optimizer_updates() -> None:
    model, x = _build("mlp", 0)
    head = model[-1]
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    attach(model, optimizer, strength=0.1, example_inputs=x, bias_strength=0.1)
    optimizer.step()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    others = [m for m in model if isinstance(m, nn.Linear) and m is not head]
    assert all(m.weight.grad is None and m.bias.grad is None for m in others)
