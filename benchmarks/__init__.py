"""Speed, memory and cost-model scripts, run from a checkout: `python -m benchmarks.<name>`.

`run` (tokens/s against mlx-lm and llama.cpp, with a roofline), `report` (markdown and charts from
every results file), `cost_model` (bytes, kernels and host syncs per decoded token, gemma_mlx
against mlx-lm, for every Gemma 4 size).
"""
