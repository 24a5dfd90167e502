"""Integrations with the frameworks and servers pyfiq runs inside: each submodule imports its
framework only when imported itself, so ``import pyfiq`` needs none of them."""
