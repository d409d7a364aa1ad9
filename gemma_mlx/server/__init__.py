"""An OpenAI- and Anthropic-compatible HTTP server for gemma_mlx (`python -m gemma_mlx.server`).

Modules, each with one job: `__main__` (command line), `app` (routes, API key, limits, error
shapes), `engine` (the interface between HTTP and generation), `scheduler` (the engine thread and
its queue), `generation` (one request's steps), `prefix_cache`, `prompts` (chat rendering and
option checks), `openai_api` / `anthropic_api` (request and response shapes), `replies` and
`tools` (Gemma 4 thinking and tool calls), `errors`, `sse`.
"""
