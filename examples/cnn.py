"""Build and save a VGG-style CNN without BatchNorm: one chain through max-pools.

Usage: python examples/cnn.py [OUT.pt2]   then   wssi-audit OUT.pt2
"""

from _common import main

if __name__ == "__main__":
    main("cnn")
