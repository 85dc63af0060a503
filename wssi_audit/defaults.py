"""The regularizer's defaults, in a module without torch: `wssi-audit finetune --help` shows them
without importing it. `wssi_audit.regularizer` re-exports them."""

# The experiments (issue 5) chose these two values.
DEFAULT_FORM = "log"
DEFAULT_STRENGTH = 2e-3  # chosen from docs/results.md (validation-selected in most cells, 10-30x below collapse)
FORMS = ("log", "balanced")
# Norms below this are clamped (value and gradient) so a collapsing layer cannot produce inf/NaN.
DEFAULT_MIN_NORM = 1e-6
