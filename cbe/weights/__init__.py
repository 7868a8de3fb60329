"""HF checkpoints as numpy, and the checkpoints cbe builds (GGUF, seeded init): shared by both backends."""
