"""Uncertainty methods on the shared fit / predict / metrics path (see `base`).

Importing this package registers every method: mle, map, mcdropout, ensemble,
blob, laplace, laplace_last, temperature, tfb, bayeslora.
"""

from bayeslora.methods.base import METHODS, Method, check_method_name, get_method, register_method
from bayeslora.methods import (  # noqa: F401  (imported for their @register_method side effect)
    bayeslora,
    blob,
    ensemble,
    laplace,
    map,
    mcdropout,
    mle,
    temperature,
    tfb,
)

__all__ = ["METHODS", "Method", "check_method_name", "get_method", "register_method"]
