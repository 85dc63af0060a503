"""Build and save a 4-layer ReLU MLP: one homogeneous chain.

Usage: python examples/mlp.py [OUT.pt2]   then   wssi-audit OUT.pt2
"""

from _common import main

if __name__ == "__main__":
    main("mlp")
