"""Keras on a backend other than TensorFlow: GradWatch must say which backend it needs.

Prints one JSON line with the error message. Run with KERAS_BACKEND set.
"""

from __future__ import annotations

import json

import keras
import numpy as np

from gradwatch.integrations.keras import GradWatch

net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
net.compile("sgd", "mse")
try:
    net.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0, callbacks=[GradWatch(log_dir=False)])
    message = ""
except RuntimeError as error:
    message = str(error)
print(json.dumps({"backend": keras.config.backend(), "error": message}))
