"""cbe: a harness for continual-learning benchmarks of language models."""
