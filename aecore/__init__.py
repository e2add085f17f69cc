"""What training and serving share: preprocessing, the manifest, the runner, anomaly scoring.

Two switches are set here, in the package's first executed line, so that they are in place
whatever submodule (or other module) is imported first:
- OpenCV reads its decompression-bomb guard from the environment when it first checks an
  image's size. An operator's own value wins.
- onnxruntime reads ORT_DISABLE_TELEMETRY when it is imported: set later (even before the first
  session) it no longer stops its usage uploads. Child processes inherit both.
"""

import os
import sys
import warnings

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 26))

if "onnxruntime" in sys.modules and os.environ.get("ORT_DISABLE_TELEMETRY") != "1":
    warnings.warn(
        "onnxruntime was imported before aecore, so its telemetry stays on in this process; "
        "set ORT_DISABLE_TELEMETRY=1 in the environment",
        RuntimeWarning,
        stacklevel=2,
    )
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
