"""Operator tools: `bench` (against plain `vllm serve`), `soak` (minutes of mixed traffic),
`loadstep` (a load step and the replicas that follow it) and `dashboard` (the Grafana
dashboard outside Grafana). They share one load client (`load`). The serving path never
imports this package; its dependencies are the `tools` extra."""
