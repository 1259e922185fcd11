"""Studying and tuning offload without the model: routing traces, the replay (the engine's eviction rule),
batched and timed replays, the cost model, calibration, the tuner and the learned predictor's training.
No torch at start-up (`simulate`); the modules that need it import it themselves."""
