"""Integrations with diffusers and transformers (optional dependencies, imported lazily)."""
