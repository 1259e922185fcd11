"""The model every family runs: shared layers, latent attention and the transformer with its routers and MoE
layer over the expert cache."""
