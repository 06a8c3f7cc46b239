"""Dense-to-MoE initialisations ("upcycling"): one function per published method.

methods.METHODS maps a name to fn(dense, spec, rng) -> ExpertFfn; router_init.ROUTER_INITS
maps a name to a router initialisation. convert.py streams whole checkpoints through them.
"""
from moe_jax.upcycle.methods import (METHODS, DenseFfn, ExpertFfn, UpcycleSpec, average_params,
                                     drop_indices, merge_experts, partition_sets)
from moe_jax.upcycle.router_init import ROUTER_INITS, check_conditioning, init_router
