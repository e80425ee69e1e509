"""Integrations with other training stacks.

``moe_ep.integrations.deepspeed``: ``MoELayer`` as a DeepSpeed MoE layer
(imports deepspeed; docs/deepspeed.md).
"""
