"""Options of offline batches: OpenAI's Batch API on the same endpoint (serve_app.serving.batches)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from serve_app.config.base import StrictModel


class BatchOptions(StrictModel):
    """Where batches and their files are kept, how large they may be, and how much of each
    model they may use."""

    enabled: bool = Field(True, description="Serve /v1/files and /v1/batches.")
    store: str = Field(
        "~/.mistral-serve/batches",
        description="Where files and batches are kept: a directory on the node that runs the batch "
        "service (the head node), or an fsspec URI (s3://..., gs://...; its library installed).",
    )
    max_file_bytes: int = Field(
        104_857_600, ge=1, description="Largest uploaded file, in bytes (413 past it)."
    )
    max_file_seconds: float = Field(
        300.0, gt=0, description="Seconds a client has to send a whole file; a slower one gets 408."
    )
    max_lines: int = Field(50_000, ge=1, description="Most requests in one batch input file.")
    max_files_per_key: int = Field(
        500, ge=1, description="Most files one key keeps (outputs included); delete some to upload more."
    )
    max_active_batches_per_key: int = Field(16, ge=1, description="Most batches of one key not yet finished.")
    max_in_flight_per_model: int = Field(
        4,
        ge=1,
        description="Batch requests sent to one model at once, over all batches: the bounded share of "
        "its concurrency that batches may take.",
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Batch requests in flight at once over all models and batches (null: only "
        "max_in_flight_per_model bounds them). Where models share hardware (the cores of one CPU "
        "machine), 1 keeps all but one engine free for interactive requests.",
    )
    priority: int = Field(
        100,
        description="vLLM scheduling priority of batch requests (lower runs first) on models whose "
        "engine_args set scheduling_policy: priority; a key's own priority applies when it is lower.",
    )
    yield_to: Literal["model", "app"] = Field(
        "model",
        description="Which interactive requests hold back and preempt batch requests until their "
        "first token: those to the same model (models on hardware of their own), or to any model "
        "of the app (models sharing hardware, e.g. the cores of one CPU machine).",
    )
    yield_until: Literal["first_token", "end"] = Field(
        "first_token",
        description="How long an interactive request holds batch requests back: until its first "
        "token (batches run beside its decoding), or until its end (they run only between "
        "interactive requests).",
    )
    preempt: bool | Literal["model"] = Field(
        True,
        description="Cancel batch requests in flight when an interactive request arrives (sent again "
        "later): true, all those it holds back (batches.yield_to); model, only those to its own "
        "model, which share its engine's steps (the others run on); false, none: they run to their "
        "end beside it.",
    )
    idle_cpu_priority: bool = Field(
        False,
        description="Run each model replica's engine processes at the OS's idle CPU priority (Linux "
        "SCHED_IDLE) while it has no interactive request in flight: batch work then takes only CPU "
        "time nothing else wants. For models sharing one machine's cores (the CPU build of vLLM); "
        "off where each engine has an accelerator of its own.",
    )
    settle_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="Seconds without interactive requests waiting before batch requests start again: "
        "a batch request started in a short gap between interactive ones is preempted by the next.",
    )
    retry_max_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait before a request the app could not take now (429, 503, a replica "
        "restarting) is sent again; the waits grow from 0.5 s to this.",
    )
