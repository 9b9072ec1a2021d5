"""CLI command modules; each defines ``register(app)`` (wired in :mod:`meddx.cli`)."""
