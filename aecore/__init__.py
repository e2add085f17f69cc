"""What training and serving share: preprocessing, the manifest, the runner, anomaly scoring.

OpenCV reads its decompression-bomb guard from the environment when it first checks an
image's size; set here, in the package's first executed line, it is in place whatever
submodule (or other module) imports cv2 first. An operator's own value wins.
"""

import os

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 26))
