"""The vLLM engine, the only code that imports vLLM.

`engine` is the engine itself; `args` turns a model config into vLLM's arguments and checks
them; `compat` finds vLLM's pieces in each supported release; `patches` mends faults of
vLLM releases, one module each, naming the releases it targets.
"""
