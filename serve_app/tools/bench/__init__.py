"""`make bench`: this app against plain `vllm serve` on the same model, machine and load.

- `driver`: the command line and the run (python -m serve_app.tools.bench);
- `targets`: what is measured (plain vLLM, vLLM with our parser fix or N frontends, this app);
- `report`: figures, the comparison table and the plot; `cpu`: CPU per process;
- `vllm_cli`: the `vllm serve` command line equal to a model config;
- `vllm_cached_server`: `vllm serve` with our replicas' parser-table fix;
- `vllm_multi_server`: vLLM's CLI (`vllm serve --api-server-count N`), also on its CPU build.
"""
