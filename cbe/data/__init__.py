"""The shared data path: JSONL loading with file:line errors, tokenization and packing."""
