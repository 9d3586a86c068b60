"""Deployment runtime: a compiled module's calling side and its artifact format.

Imports neither torch, the quantizer nor the zoo: an exported artifact runs with TVM alone.
"""

from .artifact import ArtifactError, export, load, read_verified
from .module import FlexiQModule, variant_name
from .policy import AdaptivePolicy, Policy, StaticPolicy

__all__ = ["AdaptivePolicy", "ArtifactError", "FlexiQModule", "Policy", "StaticPolicy", "export",
           "load", "read_verified", "variant_name"]
