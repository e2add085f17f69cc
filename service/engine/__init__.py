"""The engine: onnxruntime sessions of a model version and the batchers that feed them."""
