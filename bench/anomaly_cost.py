"""Cost per image of each anomaly scorer against the graphs themselves, in one run.

`python -m bench.anomaly_cost [--model models/intel-scenes/3] [--images 64]`: best of three
runs on the fixture scenes; the machine and its load are printed with the figures, and the
graphs' own cost is the baseline to read the scorers' against on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from aecore import anomaly, manifest
from aecore.machine import machine
from aecore.runner import Autoencoder

FIXTURES = Path(__file__).parent.parent / "tests" / "fixtures" / "scenes"


def best_ms(fn, n: int, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return 1000 * best / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(manifest.resolve(Path("models"), "intel-scenes")))
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    runner = Autoencoder(Path(args.model))
    paths = sorted(FIXTURES.glob("*/*.jpg"))
    inputs = np.stack([runner.preprocess(p.read_bytes()) for p in paths])
    inputs = np.resize(inputs, (args.images, *inputs.shape[1:]))
    latents, outputs = runner.reconstruct_all(inputs)
    scorers = anomaly.AnomalyScorers(runner.manifest["anomaly"], runner.folder)
    n = len(inputs)

    def score(name: str) -> np.ndarray:
        # A fresh Evidence per run, as each request has: it keeps no statistics from the last.
        return scorers.score(name, anomaly.Evidence(inputs, outputs, latents))

    ms = {"graphs (encoder + decoder)": best_ms(lambda: runner.reconstruct_all(inputs), n)}
    ms.update({name: best_ms(lambda name=name: score(name), n) for name in scorers.names})
    result = {
        "machine": machine(),
        "loadavg_1min": os.getloadavg()[0],
        "model": args.model,
        "images": n,
        "ms_per_image": {k: round(v, 2) for k, v in ms.items()},
        "relative_to_graphs": {
            k: round(v / ms["graphs (encoder + decoder)"], 3) for k, v in ms.items()
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
