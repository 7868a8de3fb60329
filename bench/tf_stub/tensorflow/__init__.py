"""NOT TensorFlow: a placeholder that lets kauldron import where TensorFlow cannot be installed, for the KD steps of
bench/gpu_check.sh on the lent GPU image (no TensorFlow there, no network, and tensorflow-cpu's 261 MiB wheel exceeds
the 64 MiB that travels). It is on the path only there: gpu_check.sh puts bench/tf_stub on PYTHONPATH for its KD steps
where TensorFlow is not installed. Never put it beside a real TensorFlow; cbe's own environments have the real one.

Why it is needed: kauldron 1.4.4 declares tensorflow-cpu as a requirement and imports it at module level on the path
that every KD run takes (`kd.train.Trainer`, `kd.data.py`): kauldron/train/setup_utils.py, kauldron/data/iterators/
noop_handler.py and tfdata_handler.py (pulled in by train/checkpoint_state.py), kauldron/data/py/base.py,
kauldron/typing/array_types.py, and clu/metric_writers/tf/summary_writer.py, which kauldron/train/metric_writer.py
imports through clu.metric_writers, with tensorboard/plugins/hparams/_keras.py and summary.py behind it; and
kauldron/data/transforms/map_transforms.py (through `kd.data.py`), whose lazy `import tensorflow` is resolved when its
Resize class is defined (a field annotated tf.image.ResizeMethod, a method decorated by autograph). Nothing in a cbe
run computes with TensorFlow (its data are numpy rows through grain): those modules need the names below only to
define their classes, type aliases and decorators, which is all this module provides. Once it is imported, etils.enp
takes TensorFlow as present and asks whether arrays are its tensors: the classes below answer no.

What it holds, each for the import-time use named beside it; any other name comes from TensorBoard's own TF-free
stand-in (tensorboard.compat.tensorflow_stub: io.gfile, compat, dtypes, errors), and anything beyond raises
AttributeError, so that a path that really needs TensorFlow fails loudly instead of computing something else.
"""

import sys
import types

from tensorboard.compat import tensorflow_stub as _tensorboard_stub
from tensorboard.util.tensor_util import make_tensor_proto  # noqa: F401  tensorboard/plugins/hparams/summary.py

__version__ = "0.0+cbe.placeholder"  # no distribution metadata either: importlib.metadata finds no TensorFlow


class Tensor:  # kauldron/typing/array_types.py's Tf* aliases; no value is ever one
    pass


class TensorSpec:  # etils.enp.lazy.is_tf: isinstance checks, always False here
    pass


def _module(name: str, **names) -> types.ModuleType:
    """A submodule (importable by its dotted name, e.g. `import tensorflow.experimental.numpy`) holding `names`."""
    module = types.ModuleType(f"{__name__}.{name}")
    module.__dict__.update(names)
    sys.modules[module.__name__] = module
    return module


def _no_op(*args, **kwargs) -> None:
    """tf.config.set_visible_devices([], "GPU") (kauldron's Setup.run, kauldron/data/py/base.py): hides the GPUs from
    TensorFlow so that it does not take their memory; with no TensorFlow there is nothing to hide them from."""


def _unchanged(function=None):
    """@tf.autograph.experimental.do_not_convert (kauldron/data/transforms/map_transforms.py): no autograph here."""
    return function


class _Placeholder:  # classes named in annotations evaluated at class creation, and base classes
    pass


class _Callback:  # tensorboard/plugins/hparams/_keras.py subclasses tf.keras.callbacks.Callback
    pass


config = _module("config", set_visible_devices=_no_op)
autograph = _module("autograph", experimental=_module("autograph.experimental", do_not_convert=_unchanged))
data = _module("data", Iterator=_Placeholder, Dataset=_Placeholder, Options=_Placeholder)
image = _module("image", ResizeMethod=_Placeholder)  # kauldron/data/transforms/map_transforms.py (Resize.method)
keras = _module("keras", callbacks=_module("keras.callbacks", Callback=_Callback))
# etils.enp.lazy.is_tf (any numpy array it is asked about): `import tensorflow.experimental.numpy`, isinstance checks
experimental = _module("experimental", numpy=_module("experimental.numpy", ndarray=_Placeholder))
__internal__ = _module("__internal__", types=_module("__internal__.types", Tensor=Tensor))


def __getattr__(name: str):
    if not name.startswith("__") and hasattr(_tensorboard_stub, name):
        return getattr(_tensorboard_stub, name)
    raise AttributeError(
        f"tensorflow.{name}: TensorFlow is not installed here; this is cbe's placeholder (bench/tf_stub), which only "
        "lets kauldron import. Install tensorflow-cpu to use a TensorFlow path."
    )
