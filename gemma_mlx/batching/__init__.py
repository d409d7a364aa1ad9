"""Continuous batching: many requests in one forward pass per step, speculative decoding included.

`gemma_mlx.batching.scheduler.BatchScheduler` is the engine; `batch_generate` runs a list of
prompts through it (`gemma_mlx.batch_generate`).
"""
