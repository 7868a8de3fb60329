"""NOT tensorflow_datasets: a placeholder beside bench/tf_stub/tensorflow (read its docstring first), on the path only
for bench/gpu_check.sh's KD steps where TensorFlow is not installed.

kauldron 1.4.4 imports tensorflow_datasets at module level in kauldron/data/iterators/tfdata_handler.py (pulled in by
kauldron/train/checkpoint_state.py on every training path) and kauldron/data/py/data_sources.py, and uses it only
inside its TFDS loaders (`tfds.as_numpy`, `tfds.data_source`), which cbe never calls: its rows are numpy arrays fed
through grain. The real package (5 MiB and its dependencies) would have to run on this module's TensorFlow placeholder;
this one has no names at all, so any use fails loudly.
"""

__version__ = "0.0+cbe.placeholder"


def __getattr__(name: str):
    raise AttributeError(
        f"tensorflow_datasets.{name}: tensorflow_datasets is not installed here; this is cbe's placeholder "
        "(bench/tf_stub), which only lets kauldron import."
    )
