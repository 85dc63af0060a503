"""Build and save a small ResNet without BatchNorm: identity and projection residual blocks.

Usage: python examples/resnet_nobn.py [OUT.pt2]   then   wssi-audit OUT.pt2
"""

from _common import main

if __name__ == "__main__":
    main("resnet_nobn")
