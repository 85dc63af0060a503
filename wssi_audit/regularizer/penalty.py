"""The penalty's value and its closed-form gradient, for each form (log, balanced), over the terms
that `coverage.plan_terms` found. Norms are computed in float32 (float64 for float64 models), never in
half precision, with autocast off; a covered layer's norm is clamped at `min_norm` so that a
collapsing layer cannot produce inf or NaN.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..auditing import Analysis
from ..defaults import DEFAULT_FORM, DEFAULT_MIN_NORM, DEFAULT_STRENGTH, FORMS
from .coverage import Coverage, modes_restored, plan_terms, unwrap_model


class ShardedModelError(TypeError):
    """The model's weights are sharded (FSDP, DTensor): the penalty needs every layer's whole norm."""


@functools.cache
def _sharded_types() -> tuple[type, ...]:
    """FSDP (both APIs) and DTensor, as far as this torch build has them."""
    found: list[type] = []
    try:
        from torch.distributed import fsdp

        found += [getattr(fsdp, name) for name in ("FullyShardedDataParallel", "FSDPModule") if hasattr(fsdp, name)]
    except (ImportError, RuntimeError):
        pass
    try:
        from torch.distributed.tensor import DTensor

        found.append(DTensor)
    except (ImportError, RuntimeError):
        pass
    return tuple(found)


def refuse_sharded(model: nn.Module) -> None:
    """Raise `ShardedModelError` for FSDP-wrapped or DTensor-sharded models: each rank holds a slice of
    every weight, so local norms (and gradients computed from them) would be wrong."""
    kinds = _sharded_types()
    if not kinds:
        return
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            raise ShardedModelError(
                f"'{name or type(module).__name__}' is FSDP-wrapped ({type(module).__name__}): the regularizer needs "
                "whole weights (each rank holds a slice of every weight): train with DistributedDataParallel instead"
            )
    for name, param in model.named_parameters():
        if isinstance(param, kinds) or isinstance(getattr(param, "data", None), kinds):
            raise ShardedModelError(
                f"parameter '{name}' is a sharded DTensor: the regularizer needs whole weights "
                "(train with DistributedDataParallel instead)"
            )


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


class WeightScaleRegularizer:
    """Invariant penalty over a model's homogeneous chains and residual blocks.

    Build it from the model (it runs `wssi_audit.analyze` itself; give `example_inputs` for models
    FX cannot trace) or from an existing `Analysis` with `from_analysis`. Use `penalty()` as a loss
    term, or `add_gradients_()` (what `attach` does at every optimizer step).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Sequence[Any] | torch.Tensor | None = None,
        *,
        strength: float = DEFAULT_STRENGTH,
        form: str = DEFAULT_FORM,
        direction_strength: float = 0.0,
        bias_strength: float = 0.0,
        min_norm: float = DEFAULT_MIN_NORM,
        analysis: Analysis | None = None,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"unknown form '{form}' (choose from {', '.join(FORMS)})")
        if strength < 0 or direction_strength < 0 or bias_strength < 0:
            raise ValueError("regularization strengths must be >= 0")
        self.model = unwrap_model(model)
        refuse_sharded(self.model)
        if analysis is None:
            from ..auditing import analyze

            with modes_restored(self.model):
                analysis = analyze(self.model, example_inputs, verify=False)
        self.analysis = analysis
        self.strength = float(strength)
        self.form = form
        self.direction_strength = float(direction_strength)
        self.bias_strength = float(bias_strength)
        self.min_norm = float(min_norm)
        self._bind(plan_terms(analysis, dict(self.model.named_parameters())))
        self._index_cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        self._grad_filter: tuple[list[int], list[int]] | None = None
        self._grad_ids: set[int] | None = None

    @classmethod
    def from_analysis(cls, analysis: Analysis, model: nn.Module, **kwargs: Any) -> WeightScaleRegularizer:
        return cls(model, analysis=analysis, **kwargs)

    def _bind(self, plan: Any) -> None:
        """The tensors each unit reads. Plain layers: their weight (the carrier) and bias. BN-folded
        layers: the BN's gamma (the carrier) and beta, with the raw weight and statistics read only."""
        params = dict(self.model.named_parameters())
        units = plan.units
        self._units, self._terms = units, plan.terms
        self._component, self._components = plan.component, plan.components
        self._covered, self._excluded = plan.covered, plan.excluded
        self._plain = [i for i, u in enumerate(units) if u.layer.bn is None]
        self._folded = [i for i, u in enumerate(units) if u.layer.bn is not None]
        self._plain_weights = [params[units[i].layer.weight] for i in self._plain]
        self._gammas = [params[units[i].layer.bn.weight] for i in self._folded]
        self._folded_weights = [self._module_tensor(units[i].layer.weight) for i in self._folded]
        self._bn_modules = [_owner(self.model, units[i].layer.bn.weight)[0] for i in self._folded]
        self._bn_eps = [float(units[i].layer.bn.eps) for i in self._folded]
        self._bias_keys = [covered.bias for covered in plan.covered]
        self._plain_bias_units = [i for i in self._plain if self._bias_keys[i] is not None]
        self._plain_biases = [params[self._bias_keys[i]] for i in self._plain_bias_units]
        self._folded_betas = [params[self._bias_keys[i]] for i in self._folded]
        self._folded_conv_bias = [
            self._module_tensor(units[i].layer.bias) if units[i].layer.bias else None for i in self._folded
        ]

    def _module_tensor(self, key: str) -> torch.Tensor:
        owner, attr = _owner(self.model, key)
        return getattr(owner, attr)

    def _indices(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Index tensors describing the structure, built once per device."""
        cached = self._index_cache.get((device, self._dtype))
        if cached is not None:
            return cached
        units, terms = self._units, self._terms
        long = {"dtype": torch.long, "device": device}
        proj = [t.projection if t.projection is not None else -1 for t in terms]
        is_branch = [1.0 if u.role == "branch" else 0.0 for u in units]
        # For the bias term: later[l, k] = 1 when k comes after l in the same chain.
        later = torch.zeros(len(units), len(units))
        for i, a in enumerate(units):
            for j, b in enumerate(units):
                if a.role == "chain" and a.chain == b.chain and b.position > a.position:
                    later[i, j] = 1.0
        rows = [torch.full((self._gammas[k].numel(),), k, dtype=torch.long) for k in range(len(self._folded))]
        cached = {
            "plain": torch.tensor(self._plain, **long),
            "folded": torch.tensor(self._folded, **long),
            "term": torch.tensor([u.term for u in units], **long),
            "branch": torch.tensor(is_branch, device=device, dtype=self._dtype),
            "projection": torch.tensor(proj, **long),
            "has_projection": torch.tensor([p >= 0 for p in proj], dtype=torch.bool, device=device),
            "is_block": torch.tensor([t.kind == "block" for t in terms], dtype=torch.bool, device=device),
            "component": torch.tensor(self._component, **long),
            "sizes": torch.bincount(
                torch.tensor([self._component[u.term] for u in units], dtype=torch.long),
                minlength=self._components,
            ).to(device=device, dtype=self._dtype),
            "later": later.to(device, self._dtype),
            "channel_unit": (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)).to(device),
            "plain_bias_units": torch.tensor(self._plain_bias_units, **long),
            "eps": torch.cat(
                [torch.full((g.numel(),), e, dtype=self._dtype) for g, e in zip(self._gammas, self._bn_eps)]
            ).to(device)
            if self._folded
            else torch.zeros(0, device=device, dtype=self._dtype),
        }
        self._index_cache[(device, self._dtype)] = cached
        return cached

    # ------------------------------------------------------------------------------- reporting
    def coverage(self) -> Coverage:
        """Covered layers (and which parameter carries each one's scale) and excluded weights, with why."""
        return Coverage(list(self._covered), list(self._excluded), self.form, self.strength)

    def covered_parameters(self) -> list[nn.Parameter]:
        """Parameters whose regularization this penalty takes over (attach gives them weight decay 0):
        carriers (weights or BN gammas) and the biases of covered layers (or BN betas)."""
        seen: dict[int, nn.Parameter] = {}
        for p in [*self._plain_weights, *self._gammas, *self._plain_biases, *self._folded_betas]:
            seen.setdefault(id(p), p)
        return list(seen.values())

    def restrict_gradients_to(self, params: Sequence[torch.Tensor] | None) -> None:
        """`add_gradients_` then only touches these parameters (e.g. those an optimizer updates, so that
        gradients never pile up on parameters nobody zeroes); None lifts the restriction."""
        if params is None:
            self._grad_filter, self._grad_ids = None, None
            return
        ids = {id(p) for p in params}
        plain = [i for i, w in enumerate(self._plain_weights) if id(w) in ids]
        folded = [k for k, g in enumerate(self._gammas) if id(g) in ids]
        if len(plain) == len(self._plain_weights) and len(folded) == len(self._gammas):
            self._grad_filter = None
        else:
            self._grad_filter = (plain, folded)
        self._grad_ids = ids

    def __repr__(self) -> str:
        return str(self.coverage())

    # ---------------------------------------------------------------------------------- numerics
    @property
    def _device(self) -> torch.device:
        first = (self._plain_weights or self._gammas or [torch.zeros(0)])[0]
        return first.device

    @property
    def _dtype(self) -> torch.dtype:
        """float32, or float64 when the covered parameters are float64 (norms never in half precision)."""
        first = (self._plain_weights or self._gammas or [torch.zeros(0)])[0]
        return torch.promote_types(first.dtype, torch.float32)

    def _autocast_off(self) -> contextlib.AbstractContextManager[Any]:
        device = self._device
        if device.type in ("cuda", "cpu", "xpu", "mps"):
            return torch.autocast(device_type=device.type, enabled=False)
        return contextlib.nullcontext()

    def _plain_norms(self, tensors: list[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
        """Norms of tensors in float32, one fused call per (device, dtype) group."""
        device = self._device
        if not tensors:
            return torch.zeros(0, device=device)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, tensor in enumerate(tensors):
            groups.setdefault((tensor.device, tensor.dtype), []).append(index)
        if len(groups) == 1:
            return torch.stack(torch._foreach_norm(tensors, ord, dtype=self._dtype))
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for indices in groups.values():
            dtype = torch.promote_types(tensors[indices[0]].dtype, torch.float32)
            norms = torch._foreach_norm([tensors[i] for i in indices], ord, dtype=dtype)
            for i, n in zip(indices, norms):
                out[i] = n.to(device, self._dtype)
        return torch.stack(out)  # type: ignore[arg-type]

    def _folded_parts(self, index: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-channel pieces of the folded layers: a = 1/sqrt(var+eps), squared row norms of W, gamma
        (and, only when the optional terms need them, L1 row norms and the bias shift b - mean)."""
        device, dtype = self._device, self._dtype
        if not self._folded:
            empty = torch.zeros(0, device=device, dtype=dtype)
            return {"a": empty, "rows2": empty, "rows1": empty, "gamma": empty, "shift": empty}
        parts: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            var = torch.cat([m.running_var for m in self._bn_modules]).to(device, dtype)
            parts["a"] = torch.rsqrt(var + index["eps"])
            weights = [w.detach().flatten(1) for w in self._folded_weights]
            parts["rows2"] = torch.cat([torch.linalg.vector_norm(w, dim=1, dtype=dtype) for w in weights]).square()
            if self.direction_strength > 0:
                parts["rows1"] = torch.cat([torch.linalg.vector_norm(w, 1, dim=1, dtype=dtype) for w in weights])
            if self.bias_strength > 0:
                mean = torch.cat([m.running_mean for m in self._bn_modules]).to(device, dtype)
                conv_bias = torch.cat(
                    [
                        b.detach().to(dtype) if b is not None else g.detach().new_zeros(g.numel(), dtype=dtype)
                        for b, g in zip(self._folded_conv_bias, self._gammas)
                    ]
                )
                parts["shift"] = conv_bias.to(device) - mean
        parts["gamma"] = torch.cat([g.to(dtype) for g in self._gammas])
        return parts

    def _norms(self, index: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Frobenius norm of every covered layer (BatchNorm folded), float32, differentiable."""
        units = len(self._units)
        norms = torch.zeros(units, device=self._device, dtype=self._dtype)
        if self._plain:
            norms = norms.index_put((index["plain"],), self._plain_norms(self._plain_weights))
        if self._folded:
            sq = (parts["gamma"] * parts["a"]).square() * parts["rows2"]
            folded = _segment_sum(sq, index["channel_unit"], len(self._folded))
            norms = norms.index_put((index["folded"],), folded.sqrt())
        return norms

    def _log_terms(self, logn: torch.Tensor, index: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log term values, log of each block's branch product) per term."""
        terms = len(self._terms)
        branch_mask = index["branch"]
        chain_part = _segment_sum(logn * (1 - branch_mask), index["term"], terms)
        branch_log = _segment_sum(logn * branch_mask, index["term"], terms)
        # Chain terms: the chain_part holds sum log n. Projection units are "projection" role, not branch:
        # they sit in chain_part of their block term, which we replace by log(n_P + P).
        shortcut_log = torch.where(
            index["has_projection"], chain_part, torch.zeros_like(chain_part)
        )  # log n_P for projection blocks, 0 (= log 1) for identity
        block_value = torch.logaddexp(shortcut_log, branch_log)
        values = torch.where(index["is_block"], block_value, chain_part)
        return values, branch_log

    def _main(self, values: torch.Tensor, index: dict[str, torch.Tensor]) -> torch.Tensor:
        sums = _segment_sum(values, index["component"], self._components)
        if self.form == "log":
            return self.strength * sums.sum()
        sizes = index["sizes"]
        return self.strength * (sizes * torch.exp(2.0 * sums / sizes)).sum()

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        index = self._indices(self._device)
        parts = self._folded_parts(index)
        norms = self._norms(index, parts)
        logn = torch.log(norms.clamp_min(self.min_norm))
        return index, parts, norms, logn

    def norms(self) -> torch.Tensor:
        """Current (folded) Frobenius norm of each covered layer, in `coverage().covered` order."""
        with torch.no_grad(), self._autocast_off():
            return self._state()[2]

    def penalty(self) -> torch.Tensor:
        """The full penalty as a differentiable float32 scalar (add it to the loss)."""
        if not self._units:
            return torch.zeros((), device=self._device, dtype=self._dtype)
        with self._autocast_off():
            index, parts, norms, logn = self._state()
            values, _ = self._log_terms(logn, index)
            total = self._main(values, index)
            return total + self._extra(index, parts, norms, logn)

    def _extra(
        self, index: dict[str, torch.Tensor], parts: dict[str, torch.Tensor], norms: torch.Tensor, logn: torch.Tensor
    ) -> torch.Tensor:
        """Direction and bias terms (differentiable; zero when their strengths are zero)."""
        total = torch.zeros((), device=self._device, dtype=self._dtype)
        safe = norms.clamp_min(self.min_norm)
        if self.direction_strength > 0:
            l1 = torch.zeros(len(self._units), device=self._device, dtype=self._dtype)
            if self._plain:
                l1 = l1.index_put((index["plain"],), self._plain_norms(self._plain_weights, 1.0))
            if self._folded:
                per = (parts["gamma"] * parts["a"]).abs() * parts["rows1"]
                folded = _segment_sum(per, index["channel_unit"], len(self._folded))
                l1 = l1.index_put((index["folded"],), folded)
            total = total + self.direction_strength * (l1 / safe).sum()
        if self.bias_strength > 0:
            bias = torch.zeros(len(self._units), device=self._device, dtype=self._dtype)
            if self._plain_biases:
                bias = bias.index_put((index["plain_bias_units"],), self._plain_norms(self._plain_biases))
            if self._folded:
                beta = torch.cat([b.to(self._dtype) for b in self._folded_betas])
                effective = parts["gamma"] * parts["a"] * parts["shift"] + beta
                sq = _segment_sum(effective.square(), index["channel_unit"], len(self._folded))
                bias = bias.index_put((index["folded"],), (sq + 1e-30).sqrt())
            has_later = index["later"].sum(1) > 0
            suffix = index["later"] @ logn
            total = total + self.bias_strength * torch.where(has_later, bias * torch.exp(suffix), 0.0).sum()
        return total

    @torch.no_grad()
    def add_gradients_(self, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Add the penalty's gradient to `.grad` of the covered parameters (closed form for the main term),
        multiplied by `scale` when given (gradients a GradScaler has not unscaled yet); returns the
        penalty's value (detached, unscaled) at no extra cost.

        d/dW log n = W / n^2; a BN-folded layer's gamma gets gamma * a^2 * rowsum(W^2) / n^2 per channel.
        The optional direction/bias terms go through autograd on their small graph.
        """
        if not self._units:
            return torch.zeros((), device=self._device, dtype=self._dtype)
        with self._autocast_off():
            index, parts, norms, logn = self._state()
            values, branch_log = self._log_terms(logn, index)
            sums = _segment_sum(values, index["component"], self._components)
            if self.form == "log":
                d_sum = torch.full_like(sums, self.strength)
            else:
                d_sum = 2.0 * self.strength * torch.exp(2.0 * sums / index["sizes"])
            d_term = d_sum[index["component"]]  # dJ / d(log term value)
            # d(log term)/d(log n_u): 1 in a chain; P/(s+P) for a branch layer; n_P/(s+P) for a projection.
            term = index["term"]
            block_value = values[term]
            branch_share = torch.exp(branch_log[term] - block_value)
            is_block = index["is_block"][term]
            is_branch = index["branch"] > 0
            share = torch.where(is_block, torch.where(is_branch, branch_share, 1.0 - branch_share), 1.0)
            clamped = norms < self.min_norm
            coef = torch.where(clamped, 0.0, d_term[term] * share / norms.clamp_min(self.min_norm).square())
            if scale is not None:
                coef = coef * (scale.to(coef.device, coef.dtype) if torch.is_tensor(scale) else float(scale))
            value = self._main(values, index)
            keep_plain, keep_folded = self._grad_filter or (None, None)
            if self._plain:
                weights = self._plain_weights
                factors = list(coef[index["plain"]].unbind())
                if keep_plain is not None:
                    weights, factors = [weights[i] for i in keep_plain], [factors[i] for i in keep_plain]
                if any(w.dtype != coef.dtype or w.device != coef.device for w in weights):
                    factors = [c.to(w.device, w.dtype) for c, w in zip(factors, weights)]
                if weights:
                    torch._foreach_add_(_grads_of(weights), torch._foreach_mul(weights, factors))
            if self._folded:
                per_channel = coef[index["folded"]][index["channel_unit"]] * parts["a"].square() * parts["rows2"]
                gammas, pieces = self._gammas, _split_like(per_channel * parts["gamma"], self._gammas)
                if keep_folded is not None:
                    gammas, pieces = [gammas[k] for k in keep_folded], [pieces[k] for k in keep_folded]
                if gammas:
                    torch._foreach_add_(_grads_of(gammas), pieces)
        if self.direction_strength > 0 or self.bias_strength > 0:
            value = value + self._add_extra_gradients(scale)
        return value

    def _add_extra_gradients(self, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Gradients of the direction and bias terms (autograd on their small graph); returns their value."""
        inputs = [*self._plain_weights, *self._gammas, *self._plain_biases, *self._folded_betas]
        unique = [p for p in {id(p): p for p in inputs}.values() if p.requires_grad]
        with torch.enable_grad(), self._autocast_off():
            index, parts, norms, logn = self._state()
            extra = self._extra(index, parts, norms, logn)
            if not extra.requires_grad:
                return extra.detach()
            grads = torch.autograd.grad(extra, unique, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(unique, grads):
                if g is None or (self._grad_ids is not None and id(p) not in self._grad_ids):
                    continue
                if scale is not None:
                    g = g * (scale.to(g.device, g.dtype) if torch.is_tensor(scale) else float(scale))
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))
        return extra.detach()


def _segment_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out[k] = sum of values[i] with index[i] == k (one fused call instead of a loop over layers)."""
    return values.new_zeros(size).index_add(0, index, values)


def _grads_of(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The `.grad` of each parameter, created as zeros where missing."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]  # type: ignore[misc]


def _split_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    pieces = torch.split(flat, [t.numel() for t in like])
    return [piece.view_as(t).to(t.dtype) for piece, t in zip(pieces, like)]
