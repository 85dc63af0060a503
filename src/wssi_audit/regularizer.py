"""The weight-scale-shift-invariant regularizer (science.md s.4), over the structure the audit found.

Penalty, with n_u the Frobenius norm of a covered layer (BatchNorm folded):

* plain chain c (not part of a residual block):   log form  sum_{u in c} log n_u
* residual block b, branch V_b1..V_bm, shortcut s_b (1 for identity, n_P for a projection):
                                                   log form  log(s_b + prod_j n_bj)
* ``form="log"``:       J = strength * sum of the terms above (the paper's main term)
* ``form="balanced"``:  J = strength * sum_c K_c exp(2 S_c / K_c), S_c the sum of the log terms of a
  component with K_c layers; a component is one plain chain in a network without residual blocks
  (= L N^{2/L}), else the whole residual network (chains joined by the residual stream).
  Bounded below by 0, and equal to weight decay's sum ||W||^2 at the balanced point.
* optional direction term ``direction_strength * sum_u ||W_u||_1 / ||W_u||_2``
* optional bias term ``bias_strength * sum_{l<L} ||b_l|| prod_{k>l} n_k`` within each plain chain.
  (Inside a residual branch this product would not be invariant to rescaling the residual stream -
  the invariant weight is the norm product up to the network output - so branches get no bias term.)

Every term is exactly invariant to function-preserving weight scale shifts inside a chain or a branch,
and to rescaling the residual stream.

BatchNorm (decision): a conv/linear layer followed by a BatchNorm is covered through its *folded* norm
``||diag(gamma / sqrt(running_var + eps)) W||`` (the eval-mode map the model deploys), but the penalty's
gradient reaches only the BatchNorm's gamma (and beta, through the bias term). In train mode the raw
conv weight feeding a BatchNorm is scale-free (batch statistics divide its scale out), so a log
penalty on it would shrink it to zero at no cost to the loss; it is excluded and keeps whatever weight
decay the user gave it. The folded value is exactly invariant to shifts written through gamma and beta
(`analysis.weights.shift_layers`) and, once running statistics follow, to rescaling the raw weight.
Chains whose output flows (through degree-1 ops) into LayerNorm / GroupNorm / an unfolded BatchNorm
are scale-free as a whole and are excluded too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .analysis.structure import Chain, Structure, WeightLayer
from .audit import Analysis, homogeneous_layers

# One place for the defaults; the experiments (issue 5) may retune these two values.
DEFAULT_FORM = "log"
DEFAULT_STRENGTH = 2e-3  # chosen from docs/results.md (validation-selected in most cells, 10-30x below collapse)
FORMS = ("log", "balanced")
# Norms below this are clamped (value and gradient) so a collapsing layer cannot produce inf/NaN.
DEFAULT_MIN_NORM = 1e-6

NORMALIZERS = {
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "batch_norm",
    "batch_norm_train",
    "batch_norm_unfoldable",
}


@dataclass
class CoveredLayer:
    """One covered layer: which tensor carries its scale, and which term it belongs to."""

    name: str
    weight: str  # state_dict key of the weight (conv/linear)
    carrier: str  # the parameter the main term's gradient reaches: the weight, or the BN's gamma
    bias: str | None  # the parameter holding its (effective) bias: its own bias or the BN's beta
    term: str  # "chain 3" or "block 1 branch" / "block 1 projection"
    folded_bn: str | None = None


@dataclass
class ExcludedWeight:
    name: str
    key: str
    reason: str


@dataclass
class Coverage:
    covered: list[CoveredLayer]
    excluded: list[ExcludedWeight]
    form: str
    strength: float

    def __str__(self) -> str:
        lines = [
            f"WeightScaleRegularizer(form={self.form}, strength={self.strength:g}): "
            f"{len(self.covered)} layers covered, {len(self.excluded)} weights excluded"
        ]
        for layer in self.covered:
            if layer.carrier != layer.weight:
                folded = f"folded norm of {layer.weight} with {layer.folded_bn}"
                lines.append(f"  + {layer.carrier} ({folded}) [{layer.term}]")
            else:
                lines.append(f"  + {layer.weight} [{layer.term}]")
        for item in self.excluded:
            lines.append(f"  - {item.key}: {item.reason}")
        return "\n".join(lines)


@dataclass
class _Unit:
    layer: WeightLayer
    term: int
    role: str  # "chain" | "branch" | "projection"
    position: int  # index inside its chain
    chain: int  # index of its chain among kept chains (for the bias term)


@dataclass
class _Term:
    label: str
    kind: str  # "chain" | "block"
    units: list[int] = field(default_factory=list)
    projection: int | None = None  # unit index of a projection shortcut


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def _modes_restored(model: nn.Module) -> Iterator[None]:
    """analyze() switches the model to eval mode; give the user back the modes they had."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _feeds_normalizer(analysis: Analysis, chain: Chain) -> str | None:
    """Name of a normalization op reached from the chain's output through degree-1 ops, if any."""
    from .ops import Role, spec_of

    graph, consumers = analysis.graph, analysis.structure.consumers
    frontier, seen = [chain.layers[-1].out], set()
    while frontier:
        current = frontier.pop()
        for reader in consumers.get(current, []):
            if reader in seen:
                continue
            seen.add(reader)
            node = graph.nodes[reader]
            if node.op in NORMALIZERS:
                return node.label
            spec = spec_of(node.op)
            if spec is not None and spec.role is Role.HOMOGENEOUS and len(node.inputs) == 1:
                frontier.append(reader)
    return None


class WeightScaleRegularizer:
    """Invariant penalty over a model's homogeneous chains and residual blocks.

    Build it from the model (it runs `wssi_audit.analyze` itself; give `example_inputs` for models
    FX cannot trace) or from an existing `Analysis` with `from_analysis`. Use `penalty()` as a loss
    term, or `add_gradients_()` (what `attach` does before each optimizer step).
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
        self.model = _unwrap(model)
        if analysis is None:
            from .audit import analyze

            with _modes_restored(self.model):
                analysis = analyze(self.model, example_inputs, verify=False)
        self.analysis = analysis
        self.strength = float(strength)
        self.form = form
        self.direction_strength = float(direction_strength)
        self.bias_strength = float(bias_strength)
        self.min_norm = float(min_norm)
        self._build(analysis.structure)
        self._index_cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        self._grad_filter: tuple[list[int], list[int]] | None = None
        self._grad_ids: set[int] | None = None

    @classmethod
    def from_analysis(cls, analysis: Analysis, model: nn.Module, **kwargs: Any) -> WeightScaleRegularizer:
        return cls(model, analysis=analysis, **kwargs)

    # ----------------------------------------------------------------- structure -> units and terms
    def _build(self, structure: Structure) -> None:
        params = dict(self.model.named_parameters())
        homogeneous = homogeneous_layers(structure)
        self._excluded: list[ExcludedWeight] = []
        in_block: dict[int, str] = {}
        projections: set[str] = set()
        for block in structure.blocks:
            in_block[block.branch.id] = f"block {block.id}"
            if block.projection is not None:
                projections.add(block.projection.node)

        def problem(layer: WeightLayer) -> str | None:
            if layer.name not in homogeneous:
                return "not in a homogeneous chain or residual block (a 1-layer chain next to a barrier)"
            carrier = layer.bn.weight if layer.bn is not None else layer.weight
            if carrier not in params:
                return f"'{carrier}' is not a parameter of the module"
            if not params[carrier].requires_grad:
                return f"'{carrier}' is frozen (requires_grad=False)"
            return None

        def exclude_chain(chain: Chain, reason: str) -> None:
            for layer in chain.layers:
                self._excluded.append(ExcludedWeight(layer.name, layer.weight, reason))

        units: list[_Unit] = []
        terms: list[_Term] = []
        kept_chains = 0

        def add_units(chain: Chain, term: int, role: str) -> list[int]:
            nonlocal kept_chains
            indices = []
            for position, layer in enumerate(chain.layers):
                indices.append(len(units))
                units.append(_Unit(layer, term, role, position, kept_chains))
            kept_chains += 1
            return indices

        projection_chain = {
            block.id: next(c for c in structure.chains if c.layers[0].node == block.projection.node)
            for block in structure.blocks
            if block.projection is not None
        }
        for block in structure.blocks:
            chains = [block.branch] + ([projection_chain[block.id]] if block.id in projection_chain else [])
            reasons = [r for c in chains for r in map(problem, c.layers) if r]
            if reasons:
                for c in chains:
                    exclude_chain(c, f"residual block {block.id} not covered: {reasons[0]}")
                continue
            term = _Term(f"block {block.id}", "block")
            term.units = add_units(block.branch, len(terms), "branch")
            if block.id in projection_chain:
                term.projection = add_units(projection_chain[block.id], len(terms), "projection")[0]
            terms.append(term)
        for chain in structure.chains:
            if chain.id in in_block or chain.layers[0].node in projections:
                continue
            reasons = [r for r in map(problem, chain.layers) if r]
            if reasons:
                exclude_chain(chain, reasons[0])
                continue
            normalizer = _feeds_normalizer(self.analysis, chain)
            if normalizer is not None:
                exclude_chain(chain, f"chain output feeds normalization '{normalizer}': its scale is unidentifiable")
                continue
            term = _Term(f"chain {chain.id}", "chain")
            term.units = add_units(chain, len(terms), "chain")
            terms.append(term)

        self._units, self._terms = units, terms
        has_blocks = any(t.kind == "block" for t in terms)
        # Balanced-form components: per chain without residual blocks, else one for the whole network.
        self._component = [0 if has_blocks else index for index in range(len(terms))]
        self._components = max(self._component, default=-1) + 1

        # Carrier parameters. Plain layers: their weight. BN-folded layers: the BN's gamma.
        self._plain = [i for i, u in enumerate(units) if u.layer.bn is None]
        self._folded = [i for i, u in enumerate(units) if u.layer.bn is not None]
        self._plain_weights = [params[units[i].layer.weight] for i in self._plain]
        self._gammas = [params[units[i].layer.bn.weight] for i in self._folded]  # type: ignore[union-attr]
        self._folded_weights = [self._module_tensor(units[i].layer.weight) for i in self._folded]
        self._bn_modules = [_owner(self.model, units[i].layer.bn.weight)[0] for i in self._folded]  # type: ignore[union-attr]
        self._bn_eps = [float(units[i].layer.bn.eps) for i in self._folded]  # type: ignore[union-attr]
        for i in self._folded:
            layer = units[i].layer
            assert layer.bn is not None
            self._excluded.append(
                ExcludedWeight(
                    layer.name,
                    layer.weight,
                    f"feeds BatchNorm '{layer.bn.name}' (scale-free in train mode): the folded norm is "
                    f"penalized through its gamma '{layer.bn.weight}'; this weight keeps its own weight decay",
                )
            )
        # Biases (for the bias term and for attach's no-decay group): own bias, or the BN's beta.
        self._bias_keys: list[str | None] = []
        for unit in units:
            layer = unit.layer
            key = layer.bn.bias if layer.bn is not None else layer.bias
            self._bias_keys.append(key if key in params else None)
        self._plain_bias_units = [i for i in self._plain if self._bias_keys[i] is not None]
        self._plain_biases = [params[self._bias_keys[i]] for i in self._plain_bias_units]  # type: ignore[index]
        self._folded_betas = [params[self._bias_keys[i]] for i in self._folded]  # type: ignore[index]
        self._folded_conv_bias = [
            self._module_tensor(units[i].layer.bias) if units[i].layer.bias else None for i in self._folded
        ]
        self._params_by_key = params
        self._covered = [
            CoveredLayer(
                name=u.layer.name,
                weight=u.layer.weight,
                carrier=u.layer.bn.weight if u.layer.bn is not None else u.layer.weight,
                bias=self._bias_keys[i],
                term=terms[u.term].label + ("" if u.role == "chain" else f" {u.role}"),
                folded_bn=u.layer.bn.name if u.layer.bn is not None else None,
            )
            for i, u in enumerate(units)
        ]
        covered_names = {u.layer.name for u in units} | {e.name for e in self._excluded}
        for layer in structure.layers:
            if layer.name not in covered_names:
                self._excluded.append(ExcludedWeight(layer.name, layer.weight, "not part of any chain term"))

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
    def add_gradients_(self) -> None:
        """Add the penalty's gradient to `.grad` of the covered parameters (closed form for the main term).

        d/dW log n = W / n^2; a BN-folded layer's gamma gets gamma * a^2 * rowsum(W^2) / n^2 per channel.
        The optional direction/bias terms go through autograd on their small graph.
        """
        if not self._units:
            return
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
            self._add_extra_gradients()

    def _add_extra_gradients(self) -> None:
        inputs = [*self._plain_weights, *self._gammas, *self._plain_biases, *self._folded_betas]
        unique = [p for p in {id(p): p for p in inputs}.values() if p.requires_grad]
        with torch.enable_grad(), self._autocast_off():
            index, parts, norms, logn = self._state()
            extra = self._extra(index, parts, norms, logn)
            if not extra.requires_grad:
                return
            grads = torch.autograd.grad(extra, unique, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(unique, grads):
                if g is None or (self._grad_ids is not None and id(p) not in self._grad_ids):
                    continue
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype))


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


# ------------------------------------------------------------------------------------------- attach
@dataclass
class RegularizerHandle:
    """Returned by `attach`; `.remove()` restores the optimizer's groups and removes the hook."""

    regularizer: WeightScaleRegularizer
    optimizer: torch.optim.Optimizer
    _hook: Any
    _moved: list[tuple[dict[str, Any], list[Any], dict[str, Any]]]  # (source group, its old params, new group)
    removed: bool = False

    def penalty(self) -> torch.Tensor:
        return self.regularizer.penalty()

    def coverage(self) -> Coverage:
        return self.regularizer.coverage()

    def remove(self) -> None:
        if self.removed:
            return
        self._hook.remove()
        for source, old_params, new_group in self._moved:
            source["params"] = old_params
            self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if g is not new_group]
        self.removed = True


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    strength: float = DEFAULT_STRENGTH,
    form: str = DEFAULT_FORM,
    *,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    regularizer: WeightScaleRegularizer | None = None,
    **options: Any,
) -> RegularizerHandle:
    """Regularize `model` invariantly inside `optimizer`: covered parameters move to param groups with
    weight_decay 0 (copies of their old groups' other settings), and the penalty's gradient is added to
    their `.grad` right before every `optimizer.step()`. Call it before building an LR scheduler (it
    adds param groups). Gradient clipping done before `step()` does not see the penalty's gradient.
    """
    reg = regularizer or WeightScaleRegularizer(model, example_inputs, strength=strength, form=form, **options)
    # Only parameters this optimizer updates (and zeroes) receive the penalty's gradient.
    reg.restrict_gradients_to([p for group in optimizer.param_groups for p in group["params"]])
    covered = {id(p) for p in reg.covered_parameters()}
    moved: list[tuple[dict[str, Any], list[Any], dict[str, Any]]] = []
    for group in list(optimizer.param_groups):
        taken = [p for p in group["params"] if id(p) in covered]
        if not taken:
            continue
        old = list(group["params"])
        group["params"] = [p for p in old if id(p) not in covered]
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group["weight_decay"] = 0.0
        new_group["params"] = taken
        optimizer.param_groups.append(new_group)
        moved.append((group, old, new_group))

    def hook(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        reg.add_gradients_()

    handle = optimizer.register_step_pre_hook(hook)
    return RegularizerHandle(reg, optimizer, handle, moved)
