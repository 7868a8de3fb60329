"""The Kauldron (JAX) backend. Importing it sets up the process for JAX before jax is imported."""

import contextlib
import importlib.util
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # kauldron imports TensorFlow; keep its start-up noise out
# TensorFlow announces its oneDNN kernels whenever its native library loads, even at TF_CPP_MIN_LOG_LEVEL=2, and the
# filter below reaches only our own import, not a load elsewhere or in a child process. Switching them off is safe: we
# compute nothing with TensorFlow (our data is numpy and grain; a KD run's losses stay the same to the last digit).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# The KD backend needs no torch: transformers' advice, in the JAX environment, that it found none is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# XLA's CPU backend (jax 0.8) can reuse weights it cached from an earlier call when a donated train state
# hands the same buffers back with new values: training then silently diverges from HF (measured: loss after
# one step 6.595 instead of 6.616). Turning its XNNPACK path off fixes it; GPUs and TPUs are unaffected.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_cpu_use_xnnpack=false"]).strip()

# TensorFlow's native start-up banners, which TF_CPP_MIN_LOG_LEVEL does not reach on every build (absl logs
# them before it is initialized). Only these lines are dropped; anything else TensorFlow prints still shows.
TF_BANNERS = re.compile(
    r"All log messages before absl::InitializeLog|port\.cc:\d+\] oneDNN custom operations|"
    r"cpu_feature_guard\.cc|^To enable the following instructions|rebuild TensorFlow with"
)


@contextlib.contextmanager
def _without_native_banners():
    """Capture what native code writes to fd 2 meanwhile, and pass on every line but TensorFlow's banners."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not TF_BANNERS.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


# kauldron imports TensorFlow (at module level: its data iterators, setup and typing modules, and clu's TF summary
# writer), so where TensorFlow is installed it is imported here first, its banners filtered once per process. Where it
# is not (the lent GPU image, where bench/gpu_check.sh puts bench/tf_stub's placeholder on the path), none are printed.
if importlib.util.find_spec("tensorflow") is not None:
    with _without_native_banners():
        import tensorflow  # noqa: F401
