"""Model checkpoints: recognising Mistral's native layout, and writing the tiny demo models."""
