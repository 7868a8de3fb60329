"""The Kauldron (JAX) backend: not built yet (its own issue); it stops with one clear line."""
from cbe.errors import UserError


class KDTrainer:
    def __init__(self, **_):
        raise UserError("backend=kd is not available yet: the Kauldron backend lands in its own issue; "
                        "use backend=hf")
