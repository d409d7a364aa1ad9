"""Pipeline parallelism over several Macs (or processes) with `mx.distributed`.

Started under `mlx.launch`, `gemma_mlx.load` splits the model over the ranks by itself
(`load_pipeline`); see docs/distributed.md.
"""

from gemma_mlx.distributed.load import load_pipeline, pipeline_group
from gemma_mlx.distributed.split import Split, plan_split
from gemma_mlx.distributed.stage import PipelineError, PipelineModel

__all__ = [
    "PipelineError",
    "PipelineModel",
    "Split",
    "load_pipeline",
    "pipeline_group",
    "plan_split",
]
