"""The HuggingFace backend (transformers, PEFT, torch): cbe.backends.hf.trainer.HFTrainer."""

import logging

# transformers imports torchao wherever it is installed (it is, for backend.trainer.fp8). On a CPU-only torch, its
# CUDA kernels cannot load and it logs so, and torch logs that two of its enums register the deprecated way: neither
# concerns a run, which would print them every time. Set before any of this package's modules imports transformers.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
