"""Start a run from a published model version: its ONNX weights copied into the Keras layers.

A published version keeps only its ONNX graphs, not the Keras checkpoint, so fine-tuning it
(e.g. adding the self-supervised terms to the MSE-only default) reads the weights back from
ONNX. The graphs of a convolutional architecture hold one Conv or ConvTranspose node per Keras
layer with weights, in the same order; each kernel is copied with its layout changed
(ONNX OIHW / IOHW -> Keras HWIO / HWOI) and the result is checked against onnxruntime with
the same limit as export's parity check, so a wrong mapping stops the run before it starts.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import onnx
from onnx import numpy_helper

from aecore import manifest
from training.onnx_export import PARITY_LIMIT, ParityError, parity

WEIGHTED_OPS = ("Conv", "ConvTranspose")


def onnx_kernels(graph: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel in Keras layout, bias) of each Conv/ConvTranspose node, in graph order."""
    proto = onnx.load(str(graph))
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    kernels = []
    for node in proto.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        weight = constants[node.input[1]]
        bias = constants[node.input[2]] if len(node.input) > 2 else None
        # Conv: (out, in, h, w) -> (h, w, in, out); ConvTranspose: (in, out, h, w) -> (h, w, out, in)
        kernels.append((weight.transpose(2, 3, 1, 0), bias))
    return kernels


def copy_weights(model: keras.Model, graph: Path, check: np.ndarray) -> float:
    """Load `graph`'s weights into `model` and return the parity on `check` (raises past the
    export limit or when the layers do not match the graph's nodes one for one)."""
    layers = [layer for layer in _leaf_layers(model) if layer.weights]
    kernels = onnx_kernels(graph)
    if len(layers) != len(kernels):
        raise ValueError(
            f"{graph.name} has {len(kernels)} weighted nodes, the architecture {len(layers)} layers"
        )
    for layer, (kernel, bias) in zip(layers, kernels, strict=True):
        wanted = [tuple(w.shape) for w in layer.weights]
        given = [kernel.shape] + ([bias.shape] if bias is not None else [])
        if wanted != given:
            raise ValueError(f"{graph.name}: layer {layer.name} wants {wanted}, graph has {given}")
        layer.set_weights([kernel] + ([bias] if bias is not None else []))
    error = parity(model, graph, check)
    if error > PARITY_LIMIT:
        raise ParityError(f"{graph.name}: weights copied but outputs differ by {error:.2e}")
    return error


def _leaf_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def initialise(
    encoder: keras.Model, decoder: keras.Model, version: Path, arch: str, latent_dim: int
) -> dict:
    """Copy a model version's encoder and decoder into freshly built ones of the same
    architecture; returns what the run records about where its weights came from."""
    body = manifest.read(version)  # verifies the graphs' sha256 too
    if body.get("architecture") != arch or body.get("latent_dim") != latent_dim:
        raise ValueError(
            f"{version} is {body.get('architecture')} with latent {body.get('latent_dim')}; "
            f"the run asks for {arch} with {latent_dim}"
        )
    files = body["files"]
    rng = np.random.default_rng(0)
    images = rng.random((4, *encoder.input_shape[1:]), dtype=np.float32)
    encoder_error = copy_weights(encoder, version / files["encoder"], images)
    latents = encoder(images, training=False).numpy()
    decoder_error = copy_weights(decoder, version / files["decoder"], latents)
    return {
        "model": f"{body['name']}/{body['version']}",
        "encoder_sha256": files["sha256"]["encoder"],
        "decoder_sha256": files["sha256"]["decoder"],
        "parity": {"encoder": encoder_error, "decoder": decoder_error},
    }
