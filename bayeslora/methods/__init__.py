"""Uncertainty methods on the shared fit / predict / metrics path (see `base`)."""

from bayeslora.methods.base import METHODS, Method, get_method, register_method

__all__ = ["METHODS", "Method", "get_method", "register_method"]
