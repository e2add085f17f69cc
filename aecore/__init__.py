"""Shared core of training and serving: preprocessing, manifests, the ONNX runner, scorers.

onnxruntime's usage telemetry is switched off here, on the package's import, because
onnxruntime reads ORT_DISABLE_TELEMETRY when it is imported: set later (even before the first
session), it no longer stops the uploads. Child processes inherit it.
"""

import os
import sys
import warnings

if "onnxruntime" in sys.modules and os.environ.get("ORT_DISABLE_TELEMETRY") != "1":
    warnings.warn(
        "onnxruntime was imported before aecore, so its telemetry stays on in this process; "
        "set ORT_DISABLE_TELEMETRY=1 in the environment",
        RuntimeWarning,
        stacklevel=2,
    )
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
