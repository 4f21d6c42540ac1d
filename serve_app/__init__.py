"""mistral-serve: several Mistral models behind one OpenAI-compatible endpoint on Ray Serve + vLLM.

The package has one room per role; an arrow is "may import":

    config/    strict, typed configuration (YAML in, pydantic out)      <- every room
    errors.py  OpenAI's error shape                                     <- every room
    models/    Mistral's checkpoint layout; the tiny demo models
    engine/    the engine contract, a registry, the fake and vLLM engines
    guards/    what a request must pass: API keys, quotas, input bounds, media
    serving/   the Serve application: builder, ingress, model server, autoscaling, telemetry
    local/     running the app on a private local Ray: launcher, HTTP fronts, processes, CLI
    tools/     operator tools: bench, soak, load step, dashboard, and their shared load client

The serving path (config, errors, models, engine, guards, serving) never imports `local` or
`tools`; `tests/unit/test_layout.py` holds the tree to these rules.
"""
