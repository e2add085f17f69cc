"""The data plane: what every protocol's routes share between a request and the engine
(admission, decoding, batching, readiness)."""
