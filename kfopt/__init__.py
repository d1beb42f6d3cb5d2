"""kfopt: make trained TensorFlow/Keras models smaller and faster.

Importing kfopt does not import TensorFlow; the heavy parts load on first use.
"""

__version__ = "0.1.0"
