"""Adapters: where each MoE architecture's routers live and how to read the routing it actually used.

Knows torch and transformers only (never the store, analysis or app). ``find_routers`` discovers the routers
generically from transformers' own declarations; ``RoutingCapture`` records decoded router calls with
read-only hooks. ``unwrap`` gives the torch module behind an nnsight-wrapped model.
"""

from moelens.adapters.capture import RouterCall, RoutingCapture
from moelens.adapters.discovery import MoEInfo, RouterSite, find_routers
from moelens.adapters.families import SUPPORTED_MODEL_TYPES
from moelens.adapters.wrapped import unwrap

__all__ = ["SUPPORTED_MODEL_TYPES", "MoEInfo", "RouterCall", "RouterSite", "RoutingCapture", "find_routers", "unwrap"]
