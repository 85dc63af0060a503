"""Plain words for every number the report shows: (term, meaning with its unit, what is normal).

Shown by `wssi-audit MODEL --explain` and in docs/cli.md.
"""

from __future__ import annotations

GLOSSARY: list[tuple[str, str, str]] = [
    (
        "decade",
        "a factor of 10: all norms are shown as log10, so 1.0 decade = 10x, 2.0 decades = 100x. Log space "
        "because products of layer norms overflow float32 in deep nets.",
        "-",
    ),
    (
        "chain",
        "layers joined only by positively homogeneous ops (ReLU, pooling, reshapes, ...): scaling one layer "
        "by g and another by 1/g leaves the network's function exactly unchanged.",
        "plain CNNs: one chain; ResNets: one per block branch",
    ),
    (
        "log10 ‖W‖",
        "log10 of a layer's Frobenius norm, with an eval-mode BatchNorm folded into the layer before it.",
        "-1 .. 2 for trained nets",
    ),
    (
        "log10 N (intrinsic norm)",
        "log10 of the product of a chain's layer norms: invariant under scale shifts, so it measures the "
        "function, not the parametrization. Units: decades.",
        "grows with depth; compare models of one architecture",
    ),
    (
        "imbalance",
        "largest minus smallest log10 ‖W‖ in a chain: where the weights sit on their shift orbit, in "
        "decades. Not a property of the function: `wssi-audit balance` sets it to 0 without changing outputs.",
        "< 0.5 (SGD from a standard init stays near 0.3); > 1 is worth balancing",
    ),
    (
        "wd excess",
        "weight decay's sum ||W||^2 over a chain divided by its minimum over the shift orbit (reached when "
        "balanced): how much weight decay is paying for the parametrization rather than the function.",
        "1 .. 1.5; thousands means badly unbalanced",
    ),
    (
        "Frobenius bound",
        "log10 of the paper's input-gradient bound: the product of per-layer Frobenius norms (conv: times "
        "the overlap factor), residual-aware. What the invariant regularizer controls; very loose.",
        "tens of decades above the measured value on real nets",
    ),
    (
        "certified bound",
        "log10 of a proven upper bound on ||dy/dx||_2 for every input: each layer's exact operator norm "
        "bound at the traced input size, propagated through the graph.",
        "a few decades above the measured value",
    ),
    (
        "measured",
        "log10 of ||dy/dx||_2 found at the example inputs (Lanczos on the Jacobian, 3 steps): a lower "
        "estimate. The truth lies between it and the certified bound.",
        "about 0 for trained classifiers",
    ),
    (
        "path-2 norm",
        "log10 of sqrt(sum over input-output paths of the product of squared weights), for plain MLPs: "
        "invariant to per-neuron rescaling too.",
        "-",
    ),
    (
        "verified",
        "the chain's end did not move (relative change under 1e-9 in float64) under three "
        "function-preserving weight scale shifts, and a control (its first layer scaled alone) did move it.",
        "every chain of 2+ layers",
    ),
    (
        "unverifiable",
        "the control did not move the chain's end (e.g. a dead chain): the check could not have failed.",
        "none",
    ),
    (
        "FAILED",
        "a function-preserving shift changed the chain's output: the analyzer claimed something false (or "
        "the chain holds NaN/Inf). Exit code 3 for an analyzer inconsistency.",
        "never",
    ),
    (
        "coverage",
        "share of the graph's ops the op table knows; unknown ops are analysed as barriers.",
        "100%",
    ),
    (
        "homogeneous weights",
        "share of weight-layer parameters inside chains of 2+ layers or residual blocks: what the invariant "
        "regularizer covers.",
        "> 50% for ReLU CNNs; low for transformers",
    ),
]
