"""offload_moe: run Mixture-of-Experts models on one memory-constrained GPU by offloading experts."""
