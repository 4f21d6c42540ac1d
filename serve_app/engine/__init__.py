"""Engines behind a model deployment: the contract and its vLLM implementation."""
