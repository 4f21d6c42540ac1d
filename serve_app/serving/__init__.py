"""The serving path: the Serve application that `serve deploy` builds and runs.

`builder.build_app` is the application's `import_path`. It binds one `server.ModelServer`
deployment per model and the OpenAI ingress (`ingress`) in front of them; each model scales
with `autoscaling`'s policy, and `telemetry` records what operators see.
"""
