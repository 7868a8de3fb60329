"""The Kauldron (JAX) backend."""
