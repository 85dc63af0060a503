"""The measured input gradient: ||dy/dx||_2 at the example inputs, a lower estimate of the Lipschitz
constant that the two bounds of `metrics` must never fall below.

Lanczos (Golub-Kahan) bidiagonalization of the Jacobian J of all float outputs with respect to all
float inputs, at the example batch, or at each batch of given data points in its place (in eval
mode examples do not interact, so J is block diagonal and its norm is the largest per-example
one). Each step is one backward pass, w = J^T u, orthogonalised against the earlier directions,
and one product z = J w. With the directions as the columns of W and their images as the columns
of Z = J W, every coefficient vector c has ||Z c|| = ||J W c|| <= ||J|| ||W c||, so
sigma_max(Z) / sigma_max(W) <= ||J||: the value reported (with every ||J^T u|| / ||u|| seen) is a
lower estimate however few steps run. On the Krylov space it searches it is the best one, where
power iteration's last iterate is not: on torchvision's ResNet-50 (random init, 224 x 224) 3 steps
come within 0.02 decades of the limit, power iteration with as many products within 0.04.

z = J w comes, in order of preference, from the runner's linearization (`Runner.linearization`:
for fx graphs a tangent pass through the ops' linear maps at the point, ReLU masks, max-pool
indices, about one forward per product), from the backward pass differentiated once more (it is
linear in its seed u, and its derivative in u along w is J w: three to four forwards on ResNet-50),
or from torch's forward mode (torch.func.jvp, used when an op has no double-backward formula: 4-5
forwards and a third of a second to start). Every step checks the product against autograd's
backward, u . (J w) = (J^T u) . w: a tangent pass that disagrees gives way to the double backward,
that to forward mode, and a product that still disagrees makes the figure "not measured", never a
wrong one. The tangent pass is a second differentiation system beside autograd; this check is its
control. Where there is a linearization, its forward is the only one: run on inputs that require
grad, its outputs are what the backward passes differentiate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import InputError, describe
from ..ir import Runner, flat_tensors

# (the function's flat float outputs at a point, with autograd's graph of that forward when the point
# requires grad; direction -> J direction there), from the runner
Linearized = tuple[torch.Tensor, Callable[[tuple[torch.Tensor, ...]], torch.Tensor]]

METHOD = "Lanczos bidiagonalization of the Jacobian at {where} (float32, {steps} steps): a lower estimate"
STEPS = 3


def _flat(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0)


def measured_log10_gradient(
    runner: Runner | None,
    steps: int = STEPS,
    seed: int = 0,
    points: torch.Tensor | None = None,
    no_runner: str = "no example input",
) -> tuple[float | None, str, str]:
    """(log10 of the lower estimate of ||J||_2, note, method). `points`: a batch of examples
    (N, ...) measured in place of the first floating-point example input, in chunks of its batch
    size; the largest figure over all of them is reported (each is a lower estimate). `no_runner`:
    the note where there is no runner."""
    if runner is None:
        return None, no_runner, ""
    handle = runner.differentiable()
    if handle is None:
        return None, "not measured: this runtime has no autograd (onnxruntime)", ""
    function, inputs = handle
    positions = [i for i, x in enumerate(inputs) if torch.is_tensor(x) and x.is_floating_point()]
    if not positions:
        return None, "not measured: the model has no floating-point input", ""
    primals = [tuple(inputs[i].detach() for i in positions)]
    where = "the example inputs"
    if points is not None:
        primals = [(chunk, *primals[0][1:]) for chunk in _chunks(points, primals[0][0])]
        where = f"{len(primals) * primals[0][0].shape[0]} data examples"

    def arguments(xs: tuple[torch.Tensor, ...]) -> list[object]:
        args = list(inputs)
        for i, x in zip(positions, xs):
            args[i] = x
        return args

    def outputs_of(*xs: torch.Tensor) -> torch.Tensor:
        return _flat([t for t in flat_tensors(function(*arguments(xs))) if t.is_floating_point()])

    def linearize(xs: tuple[torch.Tensor, ...]) -> Linearized | None:
        try:
            found = runner.linearization(function, tuple(arguments(xs)))
        except Exception:  # a tangent rule's failure: autograd computes J w instead
            return None
        if found is None:
            return None
        outputs, push = found

        def product(direction: tuple[torch.Tensor, ...]) -> torch.Tensor:
            tangents: list[torch.Tensor | None] = [None] * len(inputs)
            for i, tangent in zip(positions, direction):
                tangents[i] = tangent
            return _flat(push(tuple(tangents)))

        return _flat(outputs), product

    best, ran = 0.0, 0
    for primal in primals:
        value, note, count = _bidiagonalization(outputs_of, primal, steps, seed, linearize)
        if value is None:
            return None, note, ""
        best, ran = max(best, value), max(ran, count)
    return (math.log10(best) if best > 0 else float("-inf")), "", METHOD.format(where=where, steps=ran)


def _chunks(points: torch.Tensor, example: torch.Tensor) -> list[torch.Tensor]:
    """The data points in batches shaped like the example input (a short tail is dropped)."""
    size = int(example.shape[0]) if example.dim() else 1
    if tuple(points.shape[1:]) != tuple(example.shape[1:]):
        raise InputError(
            f"data examples of shape {tuple(points.shape[1:])} do not fit the model's input "
            f"{tuple(example.shape)} (batch dimension first)"
        )
    if points.shape[0] < size:
        raise InputError(f"{points.shape[0]} data examples are fewer than the input's batch size {size}")
    count = points.shape[0] // size
    return [points[i * size : (i + 1) * size].to(example.dtype) for i in range(count)]


def _as_vector(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return _flat([v.detach() for v in values]).to(torch.float64)


def _like(vector: torch.Tensor, primal: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The flat float64 vector cut into tensors shaped (and typed) like the inputs."""
    parts, offset = [], 0
    for x in primal:
        parts.append(vector[offset : offset + x.numel()].reshape(x.shape).to(x.dtype))
        offset += x.numel()
    return tuple(parts)


# |u . (J w) - (J^T u) . w| allowed for unit u and w, relative to the larger of ||J w|| and the
# largest ||J^T u|| seen: float32 products round at the scale of ||J||, not of their own result, so a
# late Lanczos step whose J w is 4e-6 of ||J|| carries rounding of ~1e-8 ||J||, a quarter of its own size.
ADJOINT_TOLERANCE = 1e-3


def _adjoint(u: torch.Tensor, z: torch.Tensor, expected: float, scale: float) -> bool:
    """u . (J w) against (J^T u) . w = `expected`: do the two products apply one map and its transpose?"""
    image = z.reshape(-1).to(torch.float64)
    error = abs(float(u.reshape(-1).to(torch.float64) @ image) - expected)
    return error <= ADJOINT_TOLERANCE * max(float(image.norm()), scale)


class _Products:
    """J^T u and J w at one point: backward passes, and for J w the runner's tangent pass, else the
    backward differentiated in its seed (double backward), else forward mode where an op has no
    double-backward formula."""

    def __init__(
        self,
        outputs_of: Callable[..., torch.Tensor],
        primal: tuple[torch.Tensor, ...],
        linearize: Callable[[tuple[torch.Tensor, ...]], Linearized | None] | None = None,
    ) -> None:
        self.outputs_of, self.primal = outputs_of, primal
        self.inputs = tuple(x.detach().requires_grad_() for x in primal)
        self.seed: torch.Tensor | None = None
        self.pulled: list[tuple[int, torch.Tensor]] = []  # (input position, J^T seed for it)
        self.forward_mode = False
        self.tangent: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None
        # One forward for both maps: the linearization runs the model on the inputs that require
        # grad, so its outputs carry autograd's graph of the same run its tangent steps were taken
        # from; the pullbacks differentiate that graph. The adjoint check on every product is then
        # the control that the two differentiation systems agree on one computation.
        found = linearize(self.inputs) if linearize is not None else None
        if found is not None and found[0].requires_grad:
            self.output, self.tangent = found
        else:  # no linearization, or no input reaches the output (J = 0): autograd's own forward
            self.output = outputs_of(*self.inputs)
        self.constant = not self.output.requires_grad  # no input reaches the output: J = 0

    def fall_back(self) -> bool:
        """Give up the way J w was computed for the next one (its product failed the adjoint check);
        False when none is left."""
        if self.tangent is not None:
            self.tangent = None
            return True
        if not self.forward_mode:  # the double backward missed a path: a backward that is not differentiable again
            self.forward_mode = True
            return True
        return False

    def pullback(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.constant:
            return tuple(torch.zeros_like(x) for x in self.primal)
        grads = _vjp([self.output], self.inputs, [u], retain_graph=True)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(self.primal, grads))

    def push(self, direction: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.constant:
            return torch.zeros_like(self.output)
        if self.tangent is not None:
            try:
                with torch.no_grad():
                    return self.tangent(direction)
            except Exception:  # a tangent rule that failed at run time: autograd's way instead
                self.tangent = None
        if not self.forward_mode:
            try:
                return self._double_backward(direction)
            except RuntimeError:  # an op without a double-backward formula (some say so, some
                self.forward_mode = True  # give zeros: the caller's adjoint check sees those)
        return torch.func.jvp(self.outputs_of, self.primal, direction)[1].detach()

    def _double_backward(self, direction: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.seed is None:  # J^T seed as a function of the seed, built once: it is linear in it
            self.seed = torch.zeros_like(self.output, requires_grad=True)
            grads = _vjp([self.output], self.inputs, [self.seed], create_graph=True)
            self.pulled = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not self.pulled:
            return torch.zeros_like(self.output)
        (image,) = _vjp(
            [g for _, g in self.pulled], (self.seed,), [direction[i] for i, _ in self.pulled], retain_graph=True
        )
        return torch.zeros_like(self.output) if image is None else image.detach()


def _vjp(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor], **options: bool
) -> tuple[torch.Tensor | None, ...]:
    """sum_k J_k^T seed_k, as the gradient of the scalar sum_k <output_k, seed_k>: the same numbers
    (the product's backward multiplies the seed by exactly 1) without torch.autograd.grad's
    grad_outputs, whose shape check imports sympy (0.27 s of a ResNet-50 audit)."""
    if any(o.shape != s.shape for o, s in zip(outputs, seeds, strict=True)):
        raise ValueError(
            f"seeds of {[tuple(s.shape) for s in seeds]} for outputs of {[tuple(o.shape) for o in outputs]}"
        )
    total = sum(((o * s).sum() for o, s in zip(outputs, seeds)), start=torch.zeros(()))
    return torch.autograd.grad(total, inputs, allow_unused=True, **options)


def _bidiagonalization(
    outputs_of: Callable[..., torch.Tensor],
    primal: tuple[torch.Tensor, ...],
    steps: int,
    seed: int,
    linearize: Callable[[tuple[torch.Tensor, ...]], Linearized | None] | None = None,
) -> tuple[float | None, str, int]:
    """(the lower estimate, a note when there is none, the steps run: fewer than asked when the
    Krylov space is exhausted, and then the estimate is ||J|| itself up to rounding)."""
    generator = torch.Generator().manual_seed(seed)
    not_finite = None, "not measured: the gradient is not finite", 0
    directions: list[torch.Tensor] = []  # W's columns, as the products received them
    images: list[torch.Tensor] = []  # Z's columns: J applied to each
    best = 0.0
    try:
        with torch.enable_grad():
            if not all(bool(torch.isfinite(x).all()) for x in primal):
                return None, "not measured: the input holds NaN or Inf", 0
            products = _Products(outputs_of, primal, linearize)
            output = products.output.detach()
            if not bool(torch.isfinite(output).all()):  # J there is no Jacobian of the model: ReLU masks of NaN
                return None, "not measured: the outputs at the input are not finite (NaN or Inf)", 0
            u = torch.randn(output.shape, generator=generator, dtype=output.dtype)
            for _ in range(max(steps, 1)):
                u = u / u.norm().clamp_min(1e-30)
                w = _as_vector(products.pullback(u))
                size = float(w.norm())
                if not math.isfinite(size):
                    return not_finite
                best = max(best, size)
                if directions:  # twice: one Gram-Schmidt pass loses orthogonality to rounding
                    basis = torch.stack(directions)
                    for _ in range(2):
                        w = w - basis.T @ (basis @ w)
                residual = float(w.norm())
                if residual <= 1e-4 * size or residual == 0.0:  # the Krylov space is exhausted (float32 rounding)
                    break
                direction = _like(w / residual, primal)
                z = products.push(direction)
                while not _adjoint(u, z, residual, best) and products.fall_back():
                    z = products.push(direction)
                if not math.isfinite(float(z.norm())):
                    return not_finite
                if not _adjoint(u, z, residual, best):
                    return None, "not measured: J w and J^T u disagree (u . J w != J^T u . w)", 0
                directions.append(_as_vector(direction))
                images.append(z.reshape(-1).to(torch.float64))
                u = z
            if images:
                spread = torch.linalg.matrix_norm(torch.stack(directions, 1), 2)
                best = max(best, float(torch.linalg.matrix_norm(torch.stack(images, 1), 2) / spread))
    except Exception as error:
        return None, f"not measured: {describe(error)}", 0
    return best, "", len(images)
