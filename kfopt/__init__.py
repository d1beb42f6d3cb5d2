"""kfopt: make trained TensorFlow/Keras models smaller and faster.

The Python API (see :mod:`kfopt.api`)::

    import kfopt

    result = kfopt.optimize(model, (x_train, y_train, x_test, y_test), "prune(target_sparsity=0.8)>quantize(mode=int8)")
    result = kfopt.search(model, data, rounds=2)

Both return a :class:`kfopt.result.RunResult`. Importing kfopt does not import
TensorFlow; the heavy parts load on first use.
"""

__version__ = "0.1.0"

from .api import optimize, search  # noqa: E402  (after __version__, which the API's modules read)
from .errors import KfoptError  # noqa: E402
from .result import Candidate, RunResult  # noqa: E402

__all__ = ["optimize", "search", "RunResult", "Candidate", "KfoptError", "__version__"]
