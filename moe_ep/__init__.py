"""moe_ep: an expert-parallel Mixture-of-Experts runtime (DeepSeek-family routing,
balancing, token dropping and all-to-all dispatch)."""
from .config import MoEConfig
from .layer import MoELayer
from .parallel.state import ParallelState, init_expert_parallel

__all__ = ["MoEConfig", "MoELayer", "ParallelState", "init_expert_parallel"]
__version__ = "0.1.0"
