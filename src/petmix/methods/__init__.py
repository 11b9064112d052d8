"""Continual-learning methods: what trains at each task, how blocks are weighed, extra losses."""

from petmix.methods.base import METHODS, Method, get_method

__all__ = ["METHODS", "Method", "get_method"]
