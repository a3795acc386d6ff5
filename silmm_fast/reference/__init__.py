"""Readable pure-PyTorch references of the fast ops, with the same signatures; the tests compare against them."""
