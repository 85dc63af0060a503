"""Build and save a small ResNet with BatchNorm, folded into its convolutions.

Usage: python examples/resnet_bn.py [OUT.pt2]   then   wssi-audit OUT.pt2
"""

from _common import main

if __name__ == "__main__":
    main("resnet_bn")
