"""The penultimate-layer embedding of every variant: what the drift reference summarises.

The embedding is the input of the final ``probability`` layer, the features the decision is made
from: the dense layer of the custom CNN, the head's hidden layer of transfer/finetune, and for an
ensemble the members' embeddings side by side. :func:`with_embedding` returns one model with both
outputs, sharing every weight, so scoring gets the score and the embedding from a single forward pass.
"""

from __future__ import annotations

import keras
from keras import layers

PROBABILITY = "probability"


def _both(model: keras.Model, x) -> tuple:
    """The symbolic (probability, embedding) of ``model`` applied to ``x``, from one shared computation
    (two separate calls would run the network twice)."""
    last = model.layers[-1]
    if isinstance(last, layers.Dense) and last.name == PROBABILITY:  # one network
        probability, embedding = keras.Model(model.input, [model.output, last.input], name=f"{model.name}_both")(x)
        return probability, embedding
    if isinstance(last, layers.Average) and last.name == PROBABILITY:  # an ensemble of member networks
        pairs = [_both(layer, x) for layer in model.layers if isinstance(layer, keras.Model)]
        return (layers.Average(name=f"{model.name}_probability")([p for p, _ in pairs]),
                layers.Concatenate(name=f"{model.name}_embeddings")([e for _, e in pairs]))  # fmt: skip
    if isinstance(last, keras.Model):  # a chain of sub-models: features, then the head
        for layer in model.layers[1:-1]:
            x = layer(x)
        return _both(last, x)
    raise ValueError(f"model {model.name!r} ends in {type(last).__name__} {last.name!r}, not a '{PROBABILITY}' layer: "
                     "no penultimate embedding is known for it")  # fmt: skip


def embedding_model(model: keras.Model) -> keras.Model:
    """``model``'s penultimate embedding (N, D) as a model of its own (shares every weight)."""
    image = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(image, _both(model, image)[1], name=f"{model.name}_embedding")


def with_embedding(model: keras.Model) -> keras.Model:
    """``model`` with two outputs from one forward pass: its probability (N, 1) and its penultimate embedding (N, D)."""
    image = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(image, list(_both(model, image)), name=f"{model.name}_with_embedding")
