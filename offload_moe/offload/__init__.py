"""Expert residency: the host stores (RAM, tiered over storage), the device cache of slots per row, the
eviction rule shared with the simulator, the transfer engine and the predictors behind prefetch."""
