"""Flax linen models. Pure functions of their params: `model.apply({'params': p}, ...)`."""
