"""Deployment runtime: a compiled module's calling side and its artifact format.

Imports neither torch, the quantizer nor the zoo: an exported artifact runs with TVM alone.
``artifact`` knows the file format (bytes and metadata); ``module`` builds the runnable
module on it and owns ``load``.
"""

from ..plan import variant_name
from .artifact import ArtifactError, read_verified
from .module import FlexiQModule, load
from .policy import AdaptivePolicy, Policy, StaticPolicy

__all__ = ["AdaptivePolicy", "ArtifactError", "FlexiQModule", "Policy", "StaticPolicy", "load",
           "read_verified", "variant_name"]
