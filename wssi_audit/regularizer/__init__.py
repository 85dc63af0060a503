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

Where to read what:

* `coverage`  which layers and terms are covered, and why others are excluded (from the audit);
* `penalty`   the penalty's value and its closed-form gradient, for each form;
* `attach`    the one mechanism that applies it inside any optimizer step (trainer adapters in
  `wssi_audit.integrations` build on it).
"""

from .attach import AttachError, DecoupledWeightDecayWarning, RegularizerHandle, attach
from .coverage import Coverage, CoveredLayer, ExcludedWeight
from .penalty import (
    DEFAULT_FORM,
    DEFAULT_MIN_NORM,
    DEFAULT_STRENGTH,
    FORMS,
    ShardedModelError,
    WeightScaleRegularizer,
)

__all__ = [
    "DEFAULT_FORM",
    "DEFAULT_MIN_NORM",
    "DEFAULT_STRENGTH",
    "FORMS",
    "AttachError",
    "Coverage",
    "CoveredLayer",
    "DecoupledWeightDecayWarning",
    "ExcludedWeight",
    "RegularizerHandle",
    "ShardedModelError",
    "WeightScaleRegularizer",
    "attach",
]
