"""The regularizer inside real trainers: Lightning, Hugging Face Trainer, accelerate (CPU, tiny model).

Proof standard: the trained weights equal, to float tolerance, a plain PyTorch (or same-trainer)
reference that adds `regularizer.penalty()` to the loss with the covered parameters in a
weight-decay-0 group, and differ from the same trainer without the regularizer. These libraries are
installed by the `integrations` extra (make test installs it); the tests do not skip without them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from wssi_audit.integrations.lightning import WeightScaleRegularization
from wssi_audit.models import create_model
from wssi_audit.regularizer import AttachError, DecoupledWeightDecayWarning, WeightScaleRegularizer, attach

STRENGTH = 0.05
WD = 1e-2
LR = 0.1
EXAMPLE = torch.zeros(2, 1, 8, 8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return create_model("mlp")


def _data(count: int = 64) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(count, 1, 8, 8, generator=generator)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 10, (count,), generator=generator))


def _gap(a: nn.Module, b: nn.Module) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters()))


def _assert_close(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-5, atol=atol), (key, float((x - y).abs().max()))


def _split_groups(net: nn.Module, reg: WeightScaleRegularizer) -> list[dict[str, Any]]:
    covered = {id(p) for p in reg.covered_parameters()}
    return [
        {"params": [p for p in net.parameters() if id(p) not in covered]},
        {"params": [p for p in net.parameters() if id(p) in covered], "weight_decay": 0.0},
    ]


def _lambda(step: int) -> float:
    return 1.0 / (1 + step)


# ------------------------------------------------------------------------------------------ Lightning
class _Module(L.LightningModule):
    """`how`: "attach" (wssi_audit.attach in configure_optimizers, the issue's usage), "callback"
    (optimizer and LambdaLR from here, the callback attaches) or "plain" (no regularizer)."""

    def __init__(self, how: str, schedule: bool = False) -> None:
        super().__init__()
        self.net, self.how, self.schedule = _net(), how, schedule
        self.example_input_array = EXAMPLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
        if self.how == "attach":
            attach(self.net, optimizer, strength=STRENGTH, example_inputs=EXAMPLE)
        if not self.schedule:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit(module: _Module, tmp: Path | None = None, ckpt: str | None = None, **options: Any) -> L.Trainer:
    options = {"max_epochs": 1, **options}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=tmp is not None,
        default_root_dir=tmp,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and logging
        trainer.fit(module, torch.utils.data.DataLoader(_data(), batch_size=16), ckpt_path=ckpt)
    return trainer


def _plain_loop(
    penalty: bool,
    accumulate: int = 1,
    clip: float | None = None,
    bf16: bool = False,
    schedule: bool = False,
    epochs: int = 1,
) -> nn.Module:
    """What Lightning should compute, written as a plain loop. With clipping, the documented semantics:
    clip the loss's gradient, then add the penalty's (plain autograd of penalty())."""
    net = _net()
    reg = WeightScaleRegularizer(net, EXAMPLE, strength=STRENGTH) if penalty else None
    groups = _split_groups(net, reg) if reg else net.parameters()
    optimizer = torch.optim.SGD(groups, lr=LR, momentum=0.9, weight_decay=WD)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda) if schedule else None
    batches = list(torch.utils.data.DataLoader(_data(), batch_size=16))
    for _ in range(epochs):
        for start in range(0, len(batches), accumulate):
            optimizer.zero_grad()
            for x, y in batches[start : start + accumulate]:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = nn.functional.cross_entropy(net(x), y) / accumulate
                loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            if reg is not None:
                reg.penalty().backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return net


LIGHTNING_CASES = {
    "plain": ({}, {}),
    "gradient-clipping": ({"gradient_clip_val": 0.5}, {"clip": 0.5}),
    "bf16-mixed": ({"precision": "bf16-mixed"}, {"bf16": True}),
    "accumulate-2": ({"accumulate_grad_batches": 2}, {"accumulate": 2}),
}


@pytest.mark.parametrize("case", list(LIGHTNING_CASES))
def test_lightning_attach_in_configure_optimizers_acts(case: str) -> None:
    trainer_options, loop_options = LIGHTNING_CASES[case]
    module = _Module("attach")
    _fit(module, **trainer_options)
    _assert_close(module.net, _plain_loop(penalty=True, **loop_options))
    plain = _Module("plain")
    _fit(plain, **trainer_options)
    assert _gap(module.net, plain.net) > 1e-4  # the regularizer acted (issue 10: it was bit-identical)
    # ... and plain Lightning is the plain loop: the reference is the right one.
    _assert_close(plain.net, _plain_loop(penalty=False, **loop_options))


def test_lightning_callback_with_a_scheduler_from_configure_optimizers() -> None:
    module = _Module("callback", schedule=True)
    callback = WeightScaleRegularization(strength=STRENGTH, module="net", example_inputs=EXAMPLE)
    trainer = _fit(module, callbacks=[callback])
    assert len(callback.handles) == 1 and callback.handles[0].steps == 4
    _assert_close(module.net, _plain_loop(penalty=True, schedule=True))
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and len({g["lr"] for g in groups}) == 1  # the new group follows the LambdaLR
    assert _gap(module.net, _plain_loop(penalty=False, schedule=True)) > 1e-4


def test_lightning_callback_on_the_whole_module_uses_example_input_array() -> None:
    module = _Module("callback")
    callback = WeightScaleRegularization(strength=STRENGTH)
    _fit(module, callbacks=[callback])
    _assert_close(module.net, _plain_loop(penalty=True))


def test_lightning_resume_from_checkpoint_keeps_the_groups(tmp_path: Path) -> None:
    straight = _Module("callback", schedule=True)
    _fit(straight, callbacks=[WeightScaleRegularization(strength=STRENGTH, module="net")], max_epochs=2)
    first = _Module("callback", schedule=True)
    trainer = _fit(first, tmp_path, callbacks=[WeightScaleRegularization(strength=STRENGTH, module="net")])
    checkpoint = trainer.checkpoint_callback.best_model_path
    assert Path(checkpoint).exists()
    resumed = _Module("callback", schedule=True)
    callback = WeightScaleRegularization(strength=STRENGTH, module="net")
    _fit(resumed, tmp_path, ckpt=checkpoint, callbacks=[callback], max_epochs=2)
    assert callback.handles[0].steps == 4  # only the second epoch ran here
    _assert_close(resumed.net, straight.net)
    _assert_close(straight.net, _plain_loop(penalty=True, schedule=True, epochs=2))


def test_lightning_callback_refuses_when_no_optimizer_updates_the_model() -> None:
    class Frozen(_Module):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)

    with pytest.raises(AttachError, match="no optimizer"):
        _fit(Frozen("callback"), callbacks=[WeightScaleRegularization(module="net", example_inputs=EXAMPLE)])


# ------------------------------------------------------------------------------- Hugging Face Trainer
class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class _Dicts(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = _data()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x, y = self.data[index]
        return {"x": x, "labels": y}


@pytest.fixture()
def fresh_accelerate() -> Iterator[None]:
    """accelerate keeps process-wide singletons: start and leave each test with none."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _hf_args(tmp: Path, **options: Any) -> Any:
    from transformers import TrainingArguments

    settings = {
        "output_dir": str(tmp),
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "weight_decay": WD,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "max_grad_norm": 0.0,  # the Trainer's clipping does not see the penalty's gradient (documented)
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        **options,
    }
    return TrainingArguments(**settings)


def _hf_train(kind: str, tmp: Path, resume: str | None = None, **options: Any) -> Any:
    from transformers import Trainer

    from wssi_audit.integrations.huggingface import WeightScaleRegularizedTrainer

    model = _Classifier()
    args = _hf_args(tmp, **options)
    if kind == "regularized":
        trainer = WeightScaleRegularizedTrainer(
            model=model,
            args=args,
            train_dataset=_Dicts(),
            regularizer_strength=STRENGTH,
            regularizer_module="net",
            regularizer_example_inputs=EXAMPLE,
        )
    elif kind == "reference":
        reg = WeightScaleRegularizer(model.net, EXAMPLE, strength=STRENGTH)
        covered = {id(p) for p in reg.covered_parameters()}
        names = {name for name, p in model.named_parameters() if id(p) in covered}

        class PenaltyInLoss(Trainer):
            def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
                return [n for n in super().get_decay_parameter_names(model) if n not in names]

            def compute_loss(self, model: nn.Module, inputs: Any, *rest: Any, **kwargs: Any) -> Any:
                return super().compute_loss(model, inputs, *rest, **kwargs) + reg.penalty()

        trainer = PenaltyInLoss(model=model, args=args, train_dataset=_Dicts())
    else:
        trainer = Trainer(model=model, args=args, train_dataset=_Dicts())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DecoupledWeightDecayWarning)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_hugging_face_trainer_with_accumulation_and_a_scheduler(tmp_path: Path, fresh_accelerate: None) -> None:
    regularized = _hf_train("regularized", tmp_path / "r")
    handle = regularized.regularizer_handle
    assert handle is not None and handle.steps == 4  # once per optimizer step, not per micro-batch
    reference = _hf_train("reference", tmp_path / "ref")
    _assert_close(regularized.model.net, reference.model.net)
    plain = _hf_train("plain", tmp_path / "p")
    assert _gap(regularized.model.net, plain.model.net) > 1e-4
    lrs = {g["lr"] for g in regularized.optimizer.param_groups}
    assert len(lrs) == 1 and len(regularized.optimizer.param_groups) == 3  # the cosine schedule covers all


def test_hugging_face_resume_from_checkpoint(tmp_path: Path, fresh_accelerate: None) -> None:
    straight = _hf_train("regularized", tmp_path / "a")
    _hf_train("regularized", tmp_path / "b", save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    resumed = _hf_train("regularized", tmp_path / "c", resume=str(checkpoint))
    assert resumed.regularizer_handle.steps == 2
    _assert_close(resumed.model.net, straight.model.net)


# ----------------------------------------------------------------------------------------- accelerate
def _accelerate_run(kind: str) -> nn.Module:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = _net()
    reg = WeightScaleRegularizer(net, EXAMPLE, strength=STRENGTH) if kind == "reference" else None
    optimizer = torch.optim.SGD(_split_groups(net, reg) if reg else net.parameters(), lr=LR, weight_decay=WD)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda)  # built before attach
    loader = torch.utils.data.DataLoader(_data(), batch_size=8)
    net, optimizer, loader, scheduler = accelerator.prepare(net, optimizer, loader, scheduler)
    handle = None
    if kind == "attached":  # the wrapped optimizer and scheduler, as a user holds them
        handle = attach(net, optimizer, strength=STRENGTH, example_inputs=EXAMPLE, schedulers=[scheduler])
    for x, y in loader:
        with accelerator.accumulate(net):
            loss = nn.functional.cross_entropy(net(x), y)
            if reg is not None:
                loss = loss + reg.penalty()
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    if handle is not None:
        assert handle.steps == 4  # 8 micro-batches, accumulation 2
    return accelerator.unwrap_model(net)


def test_accelerate_wrapped_optimizer_and_scheduler(fresh_accelerate: None) -> None:
    attached = _accelerate_run("attached")
    reference = _accelerate_run("reference")
    _assert_close(attached, reference)
    assert _gap(attached, _accelerate_run("plain")) > 1e-4


# ------------------------------------------------------------------------------ documented examples
DOCS = Path(__file__).resolve().parents[1] / "docs" / "regularizer.md"
MARK = "<!-- runs in tests/test_integrations.py -->"


def _documented_examples() -> dict[str, str]:
    """The Python blocks of docs/regularizer.md that follow the marker, by the heading above them."""
    text = DOCS.read_text()
    found: dict[str, str] = {}
    for piece in text.split(MARK)[1:]:
        heading = text[: text.index(piece)].rsplit("\n### ", 1)[-1].split("\n", 1)[0]
        body = piece.split("```python\n", 1)[1].split("\n```", 1)[0]
        found[heading.split(":")[0].strip()] = body
    return found


def test_the_documentation_has_one_example_per_integration() -> None:
    assert set(_documented_examples()) == {"Lightning", "Hugging Face Trainer", "accelerate", "Plain PyTorch"}


@pytest.mark.parametrize("name", ["Lightning", "Hugging Face Trainer", "accelerate", "Plain PyTorch"])
def test_documented_example_runs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_accelerate: None, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write their logs and outputs to the current directory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_documented_examples()[name], f"docs/regularizer.md ({name})", "exec"), {"__name__": "example"})
    printed = capsys.readouterr().out
    assert "covered" in printed or "optimizer steps regularized" in printed or printed.strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_lightning_16_mixed() -> None:
    """Lightning's fp16 path: the closure runs, the scaler unscales, then optimizer.step() (no closure)."""
    options = {"accelerator": "gpu", "precision": "16-mixed"}
    regularized, plain = _Module("attach"), _Module("plain")
    for module in (regularized, plain):
        trainer = L.Trainer(
            max_epochs=1,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **options,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(_data(), batch_size=16))
    reference = _net().cuda()
    reg = WeightScaleRegularizer(reference, EXAMPLE.cuda(), strength=STRENGTH)
    optimizer = torch.optim.SGD(_split_groups(reference, reg), lr=LR, momentum=0.9, weight_decay=WD)
    scaler = torch.amp.GradScaler("cuda")
    for x, y in torch.utils.data.DataLoader(_data(), batch_size=16):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(reference(x.cuda()), y.cuda())
        scaler.scale(loss + reg.penalty()).backward()
        scaler.step(optimizer)
        scaler.update()
    _assert_close(regularized.net.cpu(), reference.cpu(), atol=1e-4)
    assert _gap(regularized.net.cpu(), plain.net.cpu()) > 1e-4
