"""Plain `vllm serve` with the vLLM speed fix our replicas apply (a reference for benchmarks).

Our replicas build vLLM's tool-parser special-token tables once per tokenizer instead of once
per chat request (`serve_app.engine.vllm.patches.parser_tables`). This runs vLLM's own
OpenAI server with that same fix and nothing else, so `make bench` can tell the cost of our
serving layer apart from that fix:

    python -m serve_app.tools.bench.vllm_cached_server --model DIR [vllm serve flags...]
"""

from __future__ import annotations

import runpy
import sys

from serve_app.engine.vllm.patches import parser_tables

SERVER = "vllm.entrypoints.openai.api_server"

if __name__ == "__main__":
    parser_tables.apply()
    sys.argv = [SERVER, *sys.argv[1:]]
    runpy.run_module(SERVER, run_name="__main__", alter_sys=True)
