"""`attach` in every loop: closures, accumulation, GradScaler/AMP, schedulers, AdamW, FSDP, refusals.

Proof standard: the attached run's weights equal, to float tolerance, a reference run that adds
`regularizer.penalty()` to the loss (plain autograd, covered parameters in a weight-decay-0 group),
and differ from a run without the regularizer.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from wssi_audit.models import create_model
from wssi_audit.regularizer import (
    AttachError,
    DecoupledWeightDecayWarning,
    ShardedModelError,
    WeightScaleRegularizer,
    attach,
)

STRENGTH = 0.05
WD = 1e-2


def _model(dtype: torch.dtype = torch.float64, name: str = "mlp") -> nn.Module:
    torch.manual_seed(0)
    return create_model(name).to(dtype).train()


def _batches(count: int, size: int = 16, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 1, 8, 8, generator=generator).to(dtype), torch.randint(0, 10, (size,), generator=generator))
        for _ in range(count)
    ]


def _example(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 1, 8, 8).to(dtype)


def _reference(model: nn.Module, **options: object) -> tuple[WeightScaleRegularizer, list[dict[str, object]]]:
    """The reference's regularizer and param groups: covered parameters without weight decay."""
    reg = WeightScaleRegularizer(model, _example(next(model.parameters()).dtype), strength=STRENGTH, **options)
    covered = {id(p) for p in reg.covered_parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in covered]},
        {"params": [p for p in model.parameters() if id(p) in covered], "weight_decay": 0.0},
    ]
    return reg, groups


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _assert_same(a: nn.Module, b: nn.Module, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=rtol, atol=atol), key


def _assert_differ(a: nn.Module, b: nn.Module, margin: float) -> None:
    gap = max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters()))
    assert gap > margin, gap


def _plain_run(steps: Callable[[nn.Module, torch.optim.Optimizer], None], make: Callable[..., torch.optim.Optimizer]):
    model = _model()
    steps(model, make(model.parameters()))
    return model


# ----------------------------------------------------------------------------------------- closures
@pytest.mark.parametrize("as_keyword", [True, False])
def test_step_with_a_closure_adds_the_penalty_after_the_closure(as_keyword: bool) -> None:
    """The closure zeroes and recomputes gradients (Lightning does this): the penalty must come after."""
    batches = _batches(4)
    model, twin = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=WD)
    handle = attach(model, optimizer, strength=STRENGTH, example_inputs=_example())
    reg, groups = _reference(twin)
    reference = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=WD)
    for batch in batches:

        def closure(batch: tuple[torch.Tensor, torch.Tensor] = batch) -> torch.Tensor:
            optimizer.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            return loss

        def reference_closure(batch: tuple[torch.Tensor, torch.Tensor] = batch) -> torch.Tensor:
            reference.zero_grad()
            loss = _loss(twin, batch) + reg.penalty()
            loss.backward()
            return loss

        returned = optimizer.step(closure=closure) if as_keyword else optimizer.step(closure)
        expected = reference.step(reference_closure)
        assert float(returned) == pytest.approx(float(expected), rel=1e-10)  # the objective, penalty included
    assert handle.steps == len(batches)
    _assert_same(model, twin)

    def plain(m: nn.Module, opt: torch.optim.Optimizer) -> None:
        for batch in batches:
            opt.zero_grad()
            _loss(m, batch).backward()
            opt.step()

    _assert_differ(model, _plain_run(plain, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=WD)), 1e-4)


def test_lbfgs_calls_the_closure_many_times_and_sees_the_objective() -> None:
    batch = _batches(1, size=32)[0]
    model, twin = _model(), _model()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    attach(model, optimizer, strength=STRENGTH, example_inputs=_example())
    assert len(optimizer.param_groups) == 1  # no weight decay to take over: LBFGS keeps its single group
    reg = WeightScaleRegularizer(twin, _example(), strength=STRENGTH)
    reference = torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=4)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    def reference_closure() -> torch.Tensor:
        reference.zero_grad()
        loss = _loss(twin, batch) + reg.penalty()
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
        reference.step(reference_closure)
    _assert_same(model, twin, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------ accumulation
def test_gradient_accumulation_adds_the_penalty_once_per_step_not_per_backward() -> None:
    micro, accumulate = _batches(6, size=8), 3
    model, twin, per_backward = _model(), _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=WD)
    handle = attach(model, optimizer, strength=STRENGTH, example_inputs=_example())
    reg, groups = _reference(twin)
    reference = torch.optim.SGD(groups, lr=0.2, weight_decay=WD)
    wrong_reg, wrong_groups = _reference(per_backward)
    wrong = torch.optim.SGD(wrong_groups, lr=0.2, weight_decay=WD)
    for start in range(0, len(micro), accumulate):
        for opt in (optimizer, reference, wrong):
            opt.zero_grad()
        for batch in micro[start : start + accumulate]:
            (_loss(model, batch) / accumulate).backward()
            (_loss(twin, batch) / accumulate).backward()
            (_loss(per_backward, batch) / accumulate + wrong_reg.penalty()).backward()  # the bug to rule out
        reg.penalty().backward()
        for opt in (optimizer, reference, wrong):
            opt.step()
    assert handle.steps == len(micro) // accumulate
    _assert_same(model, twin)
    _assert_differ(model, per_backward, 1e-4)


# --------------------------------------------------------------------------------------- GradScaler
def _scaler_run(fused: bool, autocast: bool, mode: str, device: str = "cpu") -> nn.Module:
    """Float32 training with a GradScaler (autocast: bf16 on CPU, fp16 on CUDA). mode: "attach";
    "reference" (penalty() added to the loss before scaling); "plain" (no regularizer); "unscaled" (the
    penalty's gradient added without the scale a fused kernel divides out: the mistake the test must
    be able to see)."""
    model = _model(torch.float32).to(device)
    batches = [(x.to(device), y.to(device)) for x, y in _batches(4, dtype=torch.float32)]
    make = (
        (lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=WD, fused=True))
        if fused
        else (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=WD))
    )
    reg = None
    example = _example(torch.float32).to(device)
    if mode in ("attach", "unscaled"):
        optimizer = make(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DecoupledWeightDecayWarning)
            handle = attach(model, optimizer, strength=STRENGTH, example_inputs=example)
        if mode == "unscaled":
            handle._hook.remove()

            def unscaled(*_: object) -> None:
                handle.regularizer.add_gradients_()

            optimizer.register_step_pre_hook(unscaled)
    elif mode == "reference":
        reg = WeightScaleRegularizer(model, example, strength=STRENGTH)
        covered = {id(p) for p in reg.covered_parameters()}
        optimizer = make(
            [
                {"params": [p for p in model.parameters() if id(p) not in covered]},
                {"params": [p for p in model.parameters() if id(p) in covered], "weight_decay": 0.0},
            ]
        )
    else:
        optimizer = make(model.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    for batch in batches:
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            loss = nn.functional.cross_entropy(model(batch[0]).float(), batch[1])
        if reg is not None:
            loss = loss + reg.penalty()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return model.cpu()


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled-before-step", "fused-unscales-in-kernel"])
def test_grad_scaler_scaled_and_unscaled_gradients(fused: bool) -> None:
    """Non-fused: GradScaler unscales before step(), the penalty is added unscaled. Fused AdamW: the grads
    are still scaled at step() (optimizer.grad_scale), so the penalty's gradient is scaled too."""
    attached = _scaler_run(fused, autocast=False, mode="attach")
    reference = _scaler_run(fused, autocast=False, mode="reference")
    _assert_same(attached, reference, rtol=1e-5, atol=1e-6)
    _assert_differ(attached, _scaler_run(fused, autocast=False, mode="plain"), 1e-4)
    if fused:  # control: ignoring the scale visibly changes the result
        _assert_differ(_scaler_run(True, autocast=False, mode="unscaled"), reference, 1e-4)


def test_autocast_bf16_with_grad_scaler() -> None:
    attached = _scaler_run(False, autocast=True, mode="attach")
    reference = _scaler_run(False, autocast=True, mode="reference")
    _assert_same(attached, reference, rtol=1e-5, atol=1e-6)
    _assert_differ(attached, _scaler_run(False, autocast=True, mode="plain"), 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adamw"])
def test_cuda_fp16_autocast_with_grad_scaler(fused: bool) -> None:
    attached = _scaler_run(fused, autocast=True, mode="attach", device="cuda")
    reference = _scaler_run(fused, autocast=True, mode="reference", device="cuda")
    _assert_same(attached, reference, rtol=1e-4, atol=1e-5)
    _assert_differ(attached, _scaler_run(fused, autocast=True, mode="plain", device="cuda"), 1e-4)


# --------------------------------------------------------------------------------------- schedulers
def _lambda(step: int) -> float:
    return 0.5**step


def test_scheduler_built_before_attach_is_refused_unless_given() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=WD)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda)
    with pytest.raises(AttachError, match=r"schedulers=\[scheduler\]"):
        attach(model, optimizer, strength=STRENGTH, example_inputs=_example())
    count = len(list(model.parameters()))
    assert len(optimizer.param_groups) == 1 and len(optimizer.param_groups[0]["params"]) == count  # rolled back
    handle = attach(model, optimizer, strength=STRENGTH, example_inputs=_example(), schedulers=[scheduler])
    assert len(optimizer.param_groups) == 2
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * 0.5**3] * 2)
    handle.remove()
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == len(optimizer.param_groups) == 1


def test_chained_scheduler_before_attach_and_cosine_after() -> None:
    model, twin = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=WD)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    sequential = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])
    attach(model, optimizer, strength=STRENGTH, example_inputs=_example(), schedulers=[sequential])
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, weight_decay=WD)
    expected = torch.optim.lr_scheduler.SequentialLR(
        plain,
        [
            torch.optim.lr_scheduler.LinearLR(plain, start_factor=0.1, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(plain, T_max=5),
        ],
        milestones=[2],
    )
    after_model = _model()
    after = torch.optim.SGD(after_model.parameters(), lr=0.1, weight_decay=WD)
    attach(after_model, after, strength=STRENGTH, example_inputs=_example())
    built_after = torch.optim.lr_scheduler.CosineAnnealingLR(after, T_max=5)
    reference_after = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD(_model().parameters(), lr=0.1), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()" on the reference
        for _ in range(6):
            optimizer.step()
            sequential.step()
            expected.step()
            after.step()
            built_after.step()
            reference_after.step()
    lr = expected.get_last_lr()[0]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, lr])
    lr = reference_after.get_last_lr()[0]
    assert [g["lr"] for g in after.param_groups] == pytest.approx([lr, lr])


class _PerGroupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler with a per-group list attach does not know about."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.factors = [1.0] * len(optimizer.param_groups)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [base * f for base, f in zip(self.base_lrs, self.factors, strict=True)]


def test_unknown_scheduler_list_is_refused_and_rolled_back() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=WD)
    scheduler = _PerGroupScheduler(optimizer)
    with pytest.raises(AttachError, match="'factors'"):
        attach(model, optimizer, strength=STRENGTH, example_inputs=_example(), schedulers=[scheduler])
    assert len(optimizer.param_groups) == 1 and len(scheduler.base_lrs) == 1
    other = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(_model().parameters(), lr=0.1), _lambda)
    with pytest.raises(AttachError, match="another optimizer"):
        attach(model, optimizer, strength=STRENGTH, example_inputs=_example(), schedulers=[other])


# ------------------------------------------------------------------------------------------- AdamW
def test_adamw_decoupled_decay_is_replaced_with_one_warning() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=WD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = attach(model, optimizer, strength=STRENGTH, example_inputs=_example())
    decoupled = [w for w in caught if issubclass(w.category, DecoupledWeightDecayWarning)]
    assert len(decoupled) == 1 and "replaced by the penalty's gradient" in str(decoupled[0].message)
    kept, taken = optimizer.param_groups
    assert kept["weight_decay"] == WD and taken["weight_decay"] == 0.0
    assert {id(p) for p in taken["params"]} == {id(p) for p in handle.regularizer.covered_parameters()}
    for make in (
        lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=WD),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
    ):
        other = _model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attach(other, make(other.parameters()), strength=STRENGTH, example_inputs=_example())
        assert not [w for w in caught if issubclass(w.category, DecoupledWeightDecayWarning)]


# ---------------------------------------------------------------------------------------- refusals
def test_nothing_covered_or_nothing_updated_is_refused() -> None:
    transformer = create_model("transformer_block")
    with pytest.raises(AttachError, match="nothing to regularize"):
        attach(transformer, torch.optim.SGD(transformer.parameters(), lr=0.1), example_inputs=torch.randn(2, 1, 8, 8))
    model, copy_of_it = _model(), _model()
    with pytest.raises(AttachError, match="updates none"):
        attach(model, torch.optim.SGD(copy_of_it.parameters(), lr=0.1), example_inputs=_example())


def test_wrapper_without_hooks_is_refused() -> None:
    class Broken(torch.optim.Optimizer):
        def __init__(self) -> None:  # no super().__init__: no hook registry, no inner optimizer
            self.param_groups = []

    with pytest.raises(AttachError, match="not a torch optimizer"):
        attach(_model(), Broken(), example_inputs=_example())


def test_fsdp_and_zero_are_refused(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = FullyShardedDataParallel(_model(torch.float32), device_id=torch.device("cpu"))
        with pytest.raises(ShardedModelError, match="FSDP-wrapped"):
            attach(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), example_inputs=_example(torch.float32))
        sharded = _model(torch.float32)
        fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ShardedModelError, match="FSDP-wrapped"):
            attach(sharded, torch.optim.SGD(sharded.parameters(), lr=0.1), example_inputs=_example(torch.float32))
        with pytest.raises(ShardedModelError):
            WeightScaleRegularizer(sharded, _example(torch.float32))
        # Control: the same model unwrapped attaches.
        plain = _model(torch.float32)
        attach(plain, torch.optim.SGD(plain.parameters(), lr=0.1), example_inputs=_example(torch.float32))
        zero = ZeroRedundancyOptimizer(plain.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
        with pytest.raises(AttachError, match="ZeroRedundancyOptimizer"):
            attach(plain, zero, example_inputs=_example(torch.float32))
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_model_is_unwrapped(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, twin = _model(), _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, weight_decay=WD)
        attach(ddp, optimizer, strength=STRENGTH, example_inputs=_example())
        reg, groups = _reference(twin)
        reference = torch.optim.SGD(groups, lr=0.1, weight_decay=WD)
        for batch in _batches(3):
            optimizer.zero_grad()
            _loss(ddp, batch).backward()
            optimizer.step()
            reference.zero_grad()
            (_loss(twin, batch) + reg.penalty()).backward()
            reference.step()
        _assert_same(model, twin)
    finally:
        dist.destroy_process_group()


def test_remove_restores_groups_and_stops_the_penalty() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=WD)
    before = copy.deepcopy(optimizer.param_groups[0]["params"])
    handle = attach(model, optimizer, strength=STRENGTH, example_inputs=_example())
    handle.remove()
    assert [p.shape for p in optimizer.param_groups[0]["params"]] == [p.shape for p in before]
    optimizer.step()
    assert handle.steps == 0
