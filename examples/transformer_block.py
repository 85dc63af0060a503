"""Build and save a small transformer block: LayerNorm, attention and GELU are barriers.

Usage: python examples/transformer_block.py [OUT.pt2]   then   wssi-audit OUT.pt2
"""

from _common import main

if __name__ == "__main__":
    main("transformer_block")
