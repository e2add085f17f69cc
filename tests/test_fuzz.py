"""Schemathesis, every check, against the app's own OpenAPI document, in-process over ASGI.

Every operation gets generated requests, valid and invalid by its schema, with and without an
API key configured. No response may be a 5xx; every response must conform to the document
(status, content type, headers, body); schema-valid requests must be accepted and
schema-invalid ones rejected; the key must be enforced exactly where the document says.
Bounded: a few examples per operation, no shrinking, a fixed seed (see FUZZ_EXAMPLES).

Image content is generated for real: base64 (`format: byte`), multipart files, raw image
bodies and .npy tensors are real images (strategies below), so a schema-valid request must be
a 2xx. What no JSON Schema can say is accepted as an answer to schema-valid data, and
documented in the operations' descriptions: a .npy body that is not the right array, and
interpolation weights that must sum to 1 with one per input (422 on /decode, /interpolate),
and a V2 tensor whose data must hold as many values as its shape says (400 on V2 infer).
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import httpx
import hypothesis
import numpy as np
import pytest
import schemathesis
from hypothesis import strategies as st

from service.app import create_app
from tests.live import REPO, live_server
from tests.service_client import running, settings

# Examples per operation and generation mode; FUZZ_EXAMPLES=200 for a longer local run.
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
KEY = "fuzz-key"
# 403: the repository API's load/unload with model control off; 409: a refused change (the
# default model's unload, /generate without a density). schemathesis' CLI expects these too.
POSITIVE = ["2xx", "401", "403", "404", "409", "429"]
NEGATIVE = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


def _picture(ext: str):
    """Real encoded images of random content and size (what a client uploads)."""

    def make(seed: int, height: int, width: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
        return cv2.imencode(ext, pixels)[1].tobytes()

    return st.builds(make, st.integers(0, 2**16), st.integers(1, 96), st.integers(1, 96))


def _tensors(seed: int, count: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).integers(0, 256, (count, 128, 128, 3), np.uint8))
    return buf.getvalue()


for _ext in ("jpeg", "png", "webp", "bmp", "tiff"):
    schemathesis.openapi.media_type(f"image/{_ext}", _picture(f".{_ext}"))
schemathesis.openapi.media_type(
    "application/x-npy", st.builds(_tensors, st.integers(0, 2**16), st.integers(1, 2))
)
schemathesis.openapi.format(
    "byte", _picture(".jpg").map(lambda data: base64.b64encode(data).decode())
)
schemathesis.openapi.format("binary", _picture(".png"))


def config(api_key: str | None) -> schemathesis.Config:
    body = {
        "seed": 20240607,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "no-shrink": True},
        # The coverage phase enumerates boundary values per keyword: hundreds of requests.
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        "checks": {
            "positive_data_acceptance": {"expected-statuses": POSITIVE},
            # 413 is a rejection too: more images than AE_MAX_IMAGES_PER_REQUEST.
            "negative_data_rejection": {"expected-statuses": NEGATIVE},
        },
        "operations": [
            {
                "include-path-regex": "^/(decode|interpolate)$",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*POSITIVE, "422"]}},
            },
            {  # a V2 tensor's data must hold as many values as its shape says
                "include-path-regex": "^/v2/models/.*/infer$",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*POSITIVE, "400"]}},
            },
        ],
    }
    if api_key:
        body["auth"] = {"openapi": {"APIKeyHeader": {"api_key": api_key}}}
    return schemathesis.Config.from_dict(body)


# As `make serve` starts; with a key; with a key and the repository API's load and unload on.
MODES = {"open": {}, "keyed": {"api_key": KEY},
         "control": {"api_key": KEY, "model_control": "explicit"}}  # fmt: skip


def app_settings(**overrides):
    return settings(max_images_per_request=4, max_body_bytes=256 * 1024, **overrides)


@pytest.fixture(scope="module", params=list(MODES))
def api_schema(request):
    mode = MODES[request.param]
    app = create_app(app_settings(**mode))
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=config(mode.get("api_key"))
    )
    yield schema
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()  # stop the batchers started for this app


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_every_check_passes(case):
    case.call_and_validate()


# -- the document itself: generated from the settings and the model the server enforces ----


@pytest.mark.asyncio
async def test_security_is_declared_only_where_a_key_is_required():
    async with running() as c:
        open_spec = (await c.get("/openapi.json")).json()
    async with running(api_key=KEY) as c:
        keyed = (await c.get("/openapi.json")).json()
    async with running(api_key=KEY, protect_metrics=True) as c:
        metrics_keyed = (await c.get("/openapi.json")).json()
    operations = [op for item in open_spec["paths"].values() for op in item.values()]
    assert "securitySchemes" not in open_spec.get("components", {})
    assert not any("security" in op or "401" in op["responses"] for op in operations)
    assert keyed["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    for path in ("/encode", "/decode", "/reconstruct", "/anomaly-score", "/interpolate", "/model"):
        (op,) = keyed["paths"][path].values()
        assert op["security"] == [{"APIKeyHeader": []}] and "401" in op["responses"], path
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in keyed["paths"][path]["get"], path
    assert metrics_keyed["paths"]["/metrics"]["get"]["security"] == [{"APIKeyHeader": []}]


@pytest.mark.asyncio
async def test_constraints_come_from_the_settings_and_the_loaded_model():
    async with running(max_images_per_request=5, max_interpolation_steps=7) as c:
        spec = (await c.get("/openapi.json")).json()
        model = c.app.state.plane.repository.resolve(None, None).model
    paths = spec["paths"]
    for path in ("/encode", "/reconstruct", "/anomaly-score"):
        body = paths[path]["post"]["requestBody"]["content"]
        for media in ("application/json", "multipart/form-data"):
            images = body[media]["schema"]["properties"]["images"]
            assert (images["minItems"], images["maxItems"]) == (1, 5), (path, media)
    latents = paths["/decode"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"
    ]["latents"]
    assert latents["maxItems"] == 5
    assert latents["items"]["minItems"] == latents["items"]["maxItems"] == model.latent_dim
    (scorer,) = [p for p in paths["/anomaly-score"]["post"]["parameters"] if p["name"] == "scorer"]
    assert scorer["schema"]["enum"] == model.scorers.names
    variants = paths["/interpolate"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["oneOf"]
    steps = [v for v in variants if "steps" in v["required"]]
    assert len(steps) == 2 and all(v["properties"]["steps"]["maximum"] == 7 for v in steps)
    for v in steps:  # a path needs exactly two inputs
        (inputs,) = set(v["required"]) - {"steps"}
        assert v["properties"][inputs]["minItems"] == v["properties"][inputs]["maxItems"] == 2


def test_metrics_are_documented_as_text_and_probes_with_their_errors():
    paths = create_app(settings(api_key=KEY)).openapi()["paths"]
    content = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert any(media.startswith("text/plain") for media in content)
    assert {"401", "503"} <= set(paths["/model"]["get"]["responses"])
    assert "503" in paths["/readyz"]["get"]["responses"]
    assert "429" in paths["/encode"]["post"]["responses"]


# -- the schemathesis CLI, as a user runs it, against a live server -------------------------


@pytest.mark.parametrize("mode", ["open", "control"])
def test_the_schemathesis_cli_finds_no_failure_on_a_live_server(mode):
    """`st run URL/openapi.json --checks all` from the repository (so with schemathesis.toml)
    against `python -m service`: as it starts by default, and with explicit model control and
    the key. Every route is tested, the repository's load and unload among them, and the
    default model still serves at the end."""
    env = {} if mode == "open" else {"AE_API_KEY": KEY, "AE_MODEL_CONTROL": "explicit"}
    command = [str(Path(sys.executable).parent / "st"), "run", "--checks", "all",
               "--max-examples", os.environ.get("FUZZ_CLI_EXAMPLES", "15"), "--seed", "20241202"]  # fmt: skip
    if mode == "control":
        command += ["-H", f"X-API-Key: {KEY}"]
    with live_server(env) as server:
        done = subprocess.run([*command, f"{server.base}/openapi.json"], cwd=REPO,
                              capture_output=True, text=True, timeout=1200)  # fmt: skip
        ready = httpx.get(f"{server.base}/readyz", timeout=10)
    assert done.returncode == 0, done.stdout[-6000:]
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", done.stdout)
    assert selected and len(set(selected.groups())) == 1, done.stdout[-3000:]  # every route
    assert ready.status_code == 200 and ready.json()["model"] == "intel-scenes"
