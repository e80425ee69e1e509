"""moe_ep: an expert-parallel Mixture-of-Experts runtime (DeepSeek-family routing,
balancing, token dropping and all-to-all dispatch)."""
from .config import MoEConfig
from .layer import MoELayer
from .parallel.state import ParallelState, init_expert_parallel
from .replay import RoutingRecord, RoutingReplayError, record_routing, replay_routing

__all__ = ["MoEConfig", "MoELayer", "ParallelState", "RoutingRecord", "RoutingReplayError", "init_expert_parallel",
           "record_routing", "replay_routing"]
__version__ = "0.1.0"
