"""Start a run from a published model version or from another run's best checkpoint.

A run folder's `best.keras` is loaded as it is. A published version keeps only its ONNX
graphs, not the Keras checkpoint, so fine-tuning it (e.g. adding the self-supervised terms to
the MSE-only default) reads the weights back from ONNX. The graphs of a convolutional
architecture hold one Conv or ConvTranspose node per Keras layer with weights, in the same
order; each kernel is copied with its layout changed (ONNX OIHW / IOHW -> Keras HWIO / HWOI)
and the result is checked against onnxruntime with the same limit as export's parity check,
so a wrong mapping stops the run before it starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import numpy as np
import onnx
from onnx import numpy_helper

from aecore import manifest
from training.onnx_export import PARITY_LIMIT, ParityError, parity
from training.selfsup import rounded_accuracy

WEIGHTED_OPS = ("Conv", "ConvTranspose")
# A run's config fields that hold this machine's paths; recorded by name only.
PATH_KEYS = ("data", "out", "val_dir", "init_from")


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


def load_autoencoder(run_dir: Path) -> tuple[keras.Model, keras.Model]:
    """A run's best checkpoint, as (encoder, decoder)."""
    model = keras.models.load_model(
        Path(run_dir) / "best.keras", custom_objects={"rounded_accuracy": rounded_accuracy}
    )
    return model.get_layer("encoder"), model.get_layer("decoder")


def initialise(
    encoder: keras.Model, decoder: keras.Model, source: Path, arch: str, latent_dim: int
) -> dict:
    """Copy the weights of `source`, a published model version or a training run's folder, into
    freshly built encoder and decoder of the same architecture; returns what the run records
    about where its weights came from."""
    source = Path(source)
    if (source / "best.keras").is_file():
        return _from_run(encoder, decoder, source, arch, latent_dim)
    body = manifest.read(source)  # verifies the graphs' sha256 too
    _same_shape(source, body.get("architecture"), body.get("latent_dim"), arch, latent_dim)
    files = body["files"]
    rng = np.random.default_rng(0)
    images = rng.random((4, *encoder.input_shape[1:]), dtype=np.float32)
    encoder_error = copy_weights(encoder, source / files["encoder"], images)
    latents = encoder(images, training=False).numpy()
    decoder_error = copy_weights(decoder, source / files["decoder"], latents)
    return {
        "model": f"{body['name']}/{body['version']}",
        "encoder_sha256": files["sha256"]["encoder"],
        "decoder_sha256": files["sha256"]["decoder"],
        "parity": {"encoder": encoder_error, "decoder": decoder_error},
    }


def _from_run(
    encoder: keras.Model, decoder: keras.Model, run_dir: Path, arch: str, latent_dim: int
) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    _same_shape(run_dir, config.get("arch"), config.get("latent_dim"), arch, latent_dim)
    trained_encoder, trained_decoder = load_autoencoder(run_dir)
    encoder.set_weights(trained_encoder.get_weights())
    decoder.set_weights(trained_decoder.get_weights())
    checkpoint = (run_dir / "best.keras").read_bytes()
    history = run_dir / "history.csv"
    # Names, not paths (they differ between machines), and how the source was trained, so a
    # model exported from this run describes all of its weights' training, not only this run's.
    return {
        "run": run_dir.name,
        "best_keras_sha256": hashlib.sha256(checkpoint).hexdigest(),
        "epochs": len(history.read_text().splitlines()) - 1 if history.is_file() else None,
        "config": {
            **config,
            **{key: Path(config[key]).name for key in PATH_KEYS if config.get(key)},
        },
    }


def _same_shape(source: Path, arch, latent, wanted_arch: str, wanted_latent: int) -> None:
    if arch != wanted_arch or latent != wanted_latent:
        raise ValueError(
            f"{source} is {arch} with latent {latent}; "
            f"the run asks for {wanted_arch} with {wanted_latent}"
        )
