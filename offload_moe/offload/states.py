"""The hidden states a predictor may read, by the name a trace holds each under ([T, L, D] float16):
  hidden        the state entering each MoE layer (before its attention norm);
  router_input  each MoE layer's router input (its FFN's normed input, after the attention).
Here, below both, so that the predictors (torch) and the trace format (no torch) name them from one place."""

HIDDEN = ("hidden", "router_input")
