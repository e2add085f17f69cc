"""Keras -> ONNX: conversion with the contract's tensor names, the parity check, graph folders.

Its own module so that export (a model version) and compare (the reference architecture's
throughput) both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import tensorflow as tf

from aecore import manifest
from aecore.graphs import open_session, run_batched
from aecore.preprocessing import ImageSpec

OPSET = 17
PARITY_LIMIT = 1e-4


class ParityError(RuntimeError):
    """The ONNX graph does not reproduce the Keras model closely enough."""


def to_onnx(model: keras.Model, input_name: str, output_name: str, path: Path) -> Path:
    """Convert one Keras model with a dynamic batch dimension and the contract's tensor names."""
    import tf2onnx

    # from_keras breaks on Keras 3 (KeyError 'keras_tensor_...'); a traced function does not.
    signature = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=input_name)]
    function = tf.function(lambda x: model(x, training=False))
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=OPSET)
    _rename(proto.graph, proto.graph.input[0].name, input_name)
    _rename(proto.graph, proto.graph.output[0].name, output_name)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*graph.input, *graph.output):
        if value.name == old:
            value.name = new


def parity(model: keras.Model, graph: Path, batch: np.ndarray) -> float:
    """Max absolute difference between Keras and onnxruntime on the same batch."""
    expected = model(batch, training=False).numpy()
    actual = run_batched(open_session(graph), batch, batch_size=len(batch))
    return float(np.max(np.abs(expected - actual)))


def export_graphs(
    encoder: keras.Model,
    decoder: keras.Model,
    folder: Path,
    spec: ImageSpec,
    name: str,
    version: int,
    architecture: str,
) -> dict[str, Any]:
    """Write both graphs and a first `model.json` into `folder`; returns that manifest.

    The manifest makes the folder loadable by `aecore.runner.Autoencoder` at once (reports,
    calibration and comparisons run through it); export completes it before publishing.
    """
    to_onnx(encoder, "image", "latent", folder / "encoder.onnx")
    to_onnx(decoder, "latent", "image", folder / "decoder.onnx")
    body = {
        "name": name,
        "version": version,
        "architecture": architecture,
        "input": spec.manifest_block(),
        "latent_dim": int(encoder.output_shape[-1]),
        "files": manifest.file_entries(folder),
        "onnx": {"opset": OPSET, "encoder": ["image", "latent"], "decoder": ["latent", "image"]},
        "anomaly": {},  # calibrated by export once the graphs can run
    }
    manifest.write(folder, body)
    return body


def check_parity(
    encoder: keras.Model, decoder: keras.Model, folder: Path, batch: np.ndarray
) -> float:
    """Max abs difference of both graphs against Keras; raises ParityError past the limit."""
    worst = max(
        parity(encoder, folder / "encoder.onnx", batch),
        parity(decoder, folder / "decoder.onnx", encoder(batch, training=False).numpy()),
    )
    if worst > PARITY_LIMIT:
        raise ParityError(f"ONNX differs from Keras by {worst:.2e} > {PARITY_LIMIT:.0e}")
    return worst
