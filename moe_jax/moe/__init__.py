"""Mixture-of-Experts block: routers, load-balancing losses and dispatch backends."""
