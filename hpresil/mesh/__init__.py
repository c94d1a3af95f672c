"""Parallel mesh layout for dense + MoE models on NVLink domains.

Example::

    from hpresil.mesh import MeshConfig, compute_layout
    from hpresil.topology import load_map

    layout = compute_layout(MeshConfig(tp=4, ep=8), load_map())
    print(layout)                       # which groups cross nodes/domains, and why
    dense, expert = layout.dense_mesh("cuda"), layout.expert_mesh("cuda")
    ep_groups = layout.megatron_groups("ep", expert=True)   # Megatron-Core convention
"""

from hpresil.mesh.api import DENSE_DIMS, EXPERT_DIMS, MEGATRON_ORDER, MeshConfig, divisors
from hpresil.mesh.layout import MeshLayout, compute_layout, domain_label

__all__ = ["DENSE_DIMS", "EXPERT_DIMS", "MEGATRON_ORDER", "MeshConfig", "MeshLayout", "compute_layout", "divisors",
           "domain_label"]
