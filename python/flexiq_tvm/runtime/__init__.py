"""Deployment runtime: a compiled module's calling side and its artifact format.

Imports neither torch, the quantizer nor the zoo: an exported artifact runs with TVM alone.
"""

from .artifact import ArtifactError, export, load, read_verified
from .module import FlexiQModule, variant_name

__all__ = ["ArtifactError", "FlexiQModule", "export", "load", "read_verified", "variant_name"]
