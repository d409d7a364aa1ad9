"""`python -m gemma_mlx.cache_prompt`: prefill a prompt once and save its KV cache to a file
(mlx-lm's `cache_prompt`), which `gemma-mlx --prompt-cache-file FILE -p MORE` and
`stream_generate(..., prompt_cache=load_prompt_cache(FILE, model))` continue.

The file format and the Python API are `gemma_mlx.prompt_cache`; the command line is
`gemma_mlx.cli.run_cache_prompt`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from gemma_mlx.cli import run_cache_prompt

    sys.exit(run_cache_prompt())
