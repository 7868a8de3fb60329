"""Training backends. Each one is the only place its framework is imported."""
