"""What a request must pass before an engine works on it: API keys (`auth`), per-key quotas
(`quotas`), bounds on its content (`limits`) and on the media it names (`media`)."""
