"""The two JAX stacks' differences, in one place. Python 3.12 runs the current one (kauldron 1.4, gemma 4, jax 0.12);
the combined 3.11 environment beside torch keeps kauldron 1.3, gemma 3.3 and jax 0.8 (pyproject.toml says why).
Everything else cbe uses of them is the same in both."""

from kauldron import kd

# What puts the converted weights into a freshly initialized state (abstract `transform(state)` in both).
InitTransform = getattr(kd.ckpts, "InitTransform", None) or kd.ckpts.AbstractPartialLoader


def batch_sharding(trainer: kd.train.Trainer):
    """The sharding of a batch: kauldron 1.4 calls it `sharding.batch` (and raises on the old `.ds`)."""
    sharding = trainer.sharding
    return sharding.batch if hasattr(sharding, "batch") else sharding.ds
