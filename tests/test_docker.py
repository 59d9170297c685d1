"""Static checks of the deployment files in docker/ (Docker itself cannot run here).

What a ``docker compose up`` would trip over first, checked without Docker: the YAML parses,
compose uses only keys the Compose Specification allows, every file a Dockerfile copies from
the build context exists and is not dropped by its .dockerignore, the images run as a
non-root user with a health check on /healthz, and Prometheus and Grafana point at the
services, ports and folders that compose.yaml actually sets up.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CUDA = DOCKER / "compose.cuda.yaml"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")

# Keys allowed by the Compose Specification's JSON schema (compose-spec/compose-spec,
# schema/compose-spec.json, 2026): top level, a service, a service's build, its deploy.
# Extension fields ("x-...") are allowed everywhere.
COMPOSE_TOP_KEYS = {"version", "name", "include", "services", "models", "networks", "volumes", "secrets", "configs"}
COMPOSE_SERVICE_KEYS = set(
    """annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs container_name
    cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus cpuset credential_spec
    depends_on deploy develop device_cgroup_rules devices dns dns_opt dns_search domainname entrypoint env_file
    environment expose extends external_links extra_hosts gpus group_add healthcheck hostname image init ipc
    isolation label_file labels links logging mac_address mem_limit mem_reservation mem_swappiness memswap_limit
    models network_mode networks oom_kill_disable oom_score_adj pid pids_limit platform ports post_start pre_stop
    privileged profiles provider pull_policy pull_refresh_after read_only restart runtime scale secrets
    security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits
    use_api_socket user userns_mode uts volumes volumes_from working_dir""".split()
)
COMPOSE_BUILD_KEYS = set(
    """additional_contexts args cache_from cache_to context dockerfile dockerfile_inline entitlements extra_hosts
    isolation labels network no_cache platforms privileged provenance pull sbom secrets shm_size ssh tags target
    ulimits""".split()
)
COMPOSE_DEPLOY_KEYS = {
    "endpoint_mode",
    "labels",
    "mode",
    "placement",
    "replicas",
    "resources",
    "restart_policy",
    "rollback_config",
    "update_config",
}
COMPOSE_VOLUME_KEYS = {"type", "source", "target", "read_only", "consistency", "bind", "volume", "tmpfs", "image"}

SERVE_ARGS = ["tileserver", "serve", "/slides", "--host", "0.0.0.0", "--port"]


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def non_extension_keys(mapping: dict[str, Any]) -> set[str]:
    return {k for k in mapping if not k.startswith("x-")}


@dataclass
class Stage:
    """One FROM ... section of a Dockerfile, its instructions in order as (KEYWORD, arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped, backslash continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines inside a continuation are skipped by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        else:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
    return stages


def exec_form(args: str) -> list[str]:
    """Words of an exec-form (JSON array) or shell-form instruction argument."""
    if args.startswith("["):
        words = json.loads(args)
        assert isinstance(words, list)
        return [str(w) for w in words]
    return shlex.split(args)


def copy_sources(args: str) -> tuple[dict[str, str], list[str]]:
    """(flags, sources) of a COPY/ADD argument; the last word is the destination."""
    words = exec_form(args)
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(words) >= 2, f"COPY/ADD needs a source and a destination: {args!r}"
    return flags, words[:-1]


def dockerignore_patterns(dockerfile: Path, context: Path) -> list[str]:
    """BuildKit's rule: <Dockerfile>.dockerignore next to the Dockerfile wins over <context>/.dockerignore."""
    for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"), context / ".dockerignore"):
        if candidate.is_file():
            lines = candidate.read_text(encoding="utf-8").splitlines()
            return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    return []


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def is_ignored(rel_path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore ``patterns`` drop ``rel_path`` (last matching pattern wins, ``!`` re-includes).

    A pattern that matches a parent folder matches everything inside it, as in Docker.
    """
    parts = PurePosixPath(rel_path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def service_volumes(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in long syntax (short "src:dst[:ro]" strings converted)."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, _, rest = vol.partition(":")
            target, _, mode = rest.partition(":")
            out.append({"source": source, "target": target, "read_only": "ro" in mode.split(",")})
        else:
            out.append(vol)
    return out


def compose_files() -> list[Path]:
    return [COMPOSE, COMPOSE_CUDA]


def builds() -> list[tuple[str, Path, Path]]:
    """(compose file name, build context, Dockerfile) of every image compose builds (overrides merged)."""
    base = load_yaml(COMPOSE)
    out = []
    for path in compose_files():
        doc = load_yaml(path)
        for name, service in doc["services"].items():
            if "build" not in service:
                continue
            build = service["build"]
            base_build = base["services"].get(name, {}).get("build", {})
            context = build.get("context", base_build.get("context", "."))
            dockerfile = build.get("dockerfile", base_build.get("dockerfile", "Dockerfile"))
            context_dir = (DOCKER / context).resolve()
            out.append((path.name, context_dir, (context_dir / dockerfile).resolve()))
    return out


def final_command(stage: Stage) -> list[str]:
    entrypoint = exec_form(stage.all("ENTRYPOINT")[-1]) if stage.all("ENTRYPOINT") else []
    cmd = exec_form(stage.all("CMD")[-1]) if stage.all("CMD") else []
    return entrypoint + cmd


def exposed_ports(stage: Stage) -> set[int]:
    return {int(word.split("/")[0]) for args in stage.all("EXPOSE") for word in args.split()}


# --------------------------------------------------------------------------- YAML and compose


@pytest.mark.parametrize(
    "path",
    [
        COMPOSE,
        COMPOSE_CUDA,
        PROMETHEUS_YML,
        *sorted(GRAFANA.glob("provisioning/*/*.yaml")),
    ],
    ids=lambda p: str(p.relative_to(DOCKER)),
)
def test_yaml_parses_to_a_mapping(path: Path) -> None:
    assert isinstance(load_yaml(path), dict)


def test_grafana_provisioning_has_a_datasource_and_a_dashboard_provider() -> None:
    assert sorted(p.parent.name for p in GRAFANA.glob("provisioning/*/*.yaml")) == ["dashboards", "datasources"]


@pytest.mark.parametrize("path", compose_files(), ids=lambda p: p.name)
def test_compose_uses_only_spec_keys(path: Path) -> None:
    doc = load_yaml(path)
    assert non_extension_keys(doc) <= COMPOSE_TOP_KEYS, non_extension_keys(doc) - COMPOSE_TOP_KEYS
    assert doc["services"], "no services"
    for name, service in doc["services"].items():
        unknown = non_extension_keys(service) - COMPOSE_SERVICE_KEYS
        assert not unknown, f"service {name}: keys not in the compose spec: {unknown}"
        if isinstance(service.get("build"), dict):
            unknown = non_extension_keys(service["build"]) - COMPOSE_BUILD_KEYS
            assert not unknown, f"service {name}: build keys not in the compose spec: {unknown}"
        if "deploy" in service:
            unknown = non_extension_keys(service["deploy"]) - COMPOSE_DEPLOY_KEYS
            assert not unknown, f"service {name}: deploy keys not in the compose spec: {unknown}"
        for vol in service.get("volumes", []):
            if isinstance(vol, dict):
                assert set(vol) <= COMPOSE_VOLUME_KEYS, f"service {name}: volume keys {set(vol)}"
        assert "image" in service or "build" in service or path != COMPOSE, f"service {name}: no image or build"


def test_compose_runs_tileserver_prometheus_and_grafana() -> None:
    services = load_yaml(COMPOSE)["services"]
    assert {"tileserver", "prometheus", "grafana"} <= set(services)
    assert "build" in services["tileserver"]


def test_cuda_override_only_changes_existing_services() -> None:
    assert set(load_yaml(COMPOSE_CUDA)["services"]) <= set(load_yaml(COMPOSE)["services"])


def test_compose_named_volumes_are_declared() -> None:
    doc = load_yaml(COMPOSE)
    declared = set(doc.get("volumes") or {})
    for name, service in doc["services"].items():
        for vol in service_volumes(service):
            source = str(vol.get("source", ""))
            if source and not source.startswith((".", "/", "$", "~")):
                assert source in declared, f"service {name}: named volume {source!r} is not declared"


def test_compose_bind_mounts_exist() -> None:
    for name, service in load_yaml(COMPOSE)["services"].items():
        for vol in service_volumes(service):
            source = str(vol.get("source", ""))
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"service {name}: bind source {source} is missing"


def test_slides_are_mounted_read_only_where_the_server_reads_them() -> None:
    tileserver = load_yaml(COMPOSE)["services"]["tileserver"]
    slides = [v for v in service_volumes(tileserver) if v["target"] == "/slides"]
    assert len(slides) == 1
    assert slides[0]["read_only"] is True


# --------------------------------------------------------------------------- Dockerfiles


def test_every_dockerfile_is_built_by_compose() -> None:
    built = {dockerfile for _, _, dockerfile in builds()}
    assert {p.resolve() for p in DOCKERFILES} == built
    assert len(DOCKERFILES) == 2  # CPU and CUDA


@pytest.mark.parametrize(("compose_name", "context", "dockerfile"), builds(), ids=lambda v: getattr(v, "name", v))
def test_copy_sources_exist_in_the_build_context(compose_name: str, context: Path, dockerfile: Path) -> None:
    assert dockerfile.is_file(), f"{compose_name} builds {dockerfile}, which does not exist"
    stages = parse_dockerfile(dockerfile)
    ignore = dockerignore_patterns(dockerfile, context)
    checked = 0
    for i, stage in enumerate(stages):
        earlier = {s.name for s in stages[:i]} | {str(n) for n in range(i)}
        for keyword in ("COPY", "ADD"):
            for args in stage.all(keyword):
                flags, sources = copy_sources(args)
                if "from" in flags:
                    assert flags["from"] in earlier, (
                        f"{dockerfile.name}: COPY --from={flags['from']} names no earlier stage"
                    )
                    continue
                for source in sources:
                    assert not re.match(r"^[a-z]+://", source), f"{dockerfile.name}: {keyword} of a URL: {source}"
                    rel = source.rstrip("/") or "."
                    assert (context / rel).exists(), f"{dockerfile.name}: {keyword} {source}: not in {context}"
                    assert not is_ignored(rel, ignore), f"{dockerfile.name}: {source} is excluded by .dockerignore"
                    checked += 1
    assert checked, f"{dockerfile.name} copies nothing from the build context"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_scripts_run_from_the_context_exist(dockerfile: Path) -> None:
    for stage in parse_dockerfile(dockerfile):
        for args in stage.all("RUN"):
            for script in re.findall(r"\b(?:ba)?sh\s+(\S+\.sh)\b", args):
                assert (ROOT / script).is_file(), f"{dockerfile.name} runs {script}, which does not exist"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage(dockerfile: Path) -> None:
    stages = parse_dockerfile(dockerfile)
    assert len(stages) >= 2
    final = stages[-1]
    assert any(flags_from(args) for args in final.all("COPY")), "final stage copies nothing from a build stage"


def flags_from(copy_args: str) -> str | None:
    flags, _ = copy_sources(copy_args)
    return flags.get("from")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root(dockerfile: Path) -> None:
    final = parse_dockerfile(dockerfile)[-1]
    users = final.all("USER")
    assert users, f"{dockerfile.name}: the final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    # USER comes before the command, so the server process itself is not root.
    keywords = [kw for kw, _ in final.instructions]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_serves_slides_on_the_exposed_port_with_a_healthz_check(dockerfile: Path) -> None:
    final = parse_dockerfile(dockerfile)[-1]
    command = final_command(final)
    assert command[: len(SERVE_ARGS)] == SERVE_ARGS
    port = int(command[len(SERVE_ARGS)])
    assert exposed_ports(final) == {port}
    assert "/slides" in " ".join(final.all("VOLUME"))
    (check,) = final.all("HEALTHCHECK")
    assert f"127.0.0.1:{port}/healthz" in check or f"localhost:{port}/healthz" in check
    assert " CMD " in f" {check} "


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_pins_match_pyproject(dockerfile: Path) -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if "==" in d)
    text = dockerfile.read_text(encoding="utf-8")
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        match = re.search(rf"^ARG {arg}=(\S+)$", text, re.MULTILINE)
        assert match, f"{dockerfile.name}: no ARG {arg}"
        assert match.group(1) == pins[package], f"{dockerfile.name}: {package} {match.group(1)} != {pins[package]}"


def test_cpu_image_installs_cpu_torch_and_cuda_image_a_cuda_base() -> None:
    cpu = (DOCKER / "Dockerfile.cpu").read_text(encoding="utf-8")
    cuda = (DOCKER / "Dockerfile.cuda").read_text(encoding="utf-8")
    assert "download.pytorch.org/whl/cpu" in cpu
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", cuda, re.MULTILINE)
    assert "download.pytorch.org/whl/cu" in cuda


def test_compose_publishes_the_port_the_image_serves() -> None:
    port = int(final_command(parse_dockerfile(DOCKER / "Dockerfile.cpu")[-1])[len(SERVE_ARGS)])
    ports = [str(p) for p in load_yaml(COMPOSE)["services"]["tileserver"]["ports"]]
    assert any(p.rsplit(":", 1)[-1] == str(port) for p in ports), ports


# --------------------------------------------------------------------------- Prometheus and Grafana


def scrape_targets() -> list[str]:
    config = load_yaml(PROMETHEUS_YML)
    return [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]


def test_prometheus_scrapes_the_tileserver_service_port() -> None:
    services = load_yaml(COMPOSE)["services"]
    port = int(final_command(parse_dockerfile(DOCKER / "Dockerfile.cpu")[-1])[len(SERVE_ARGS)])
    (target,) = scrape_targets()
    host, _, target_port = target.partition(":")
    assert host == "tileserver" and host in services
    assert int(target_port) == port
    (job,) = load_yaml(PROMETHEUS_YML)["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_loads_the_config_file_compose_mounts() -> None:
    prometheus = load_yaml(COMPOSE)["services"]["prometheus"]
    mounted = {v["target"]: v["source"] for v in service_volumes(prometheus)}
    config_flags = [a.split("=", 1)[1] for a in prometheus.get("command", []) if a.startswith("--config.file=")]
    config_path = config_flags[0] if config_flags else "/etc/prometheus/prometheus.yml"
    assert (DOCKER / mounted[config_path]).resolve() == PROMETHEUS_YML.resolve()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_scrape_config(tmp_path: Path) -> None:
    # promtool resolves the config's relative paths next to it; a copy keeps docker/ untouched.
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS_YML.read_text(encoding="utf-8"), encoding="utf-8")
    result = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def grafana_mounts() -> dict[str, Path]:
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    return {
        v["target"]: (DOCKER / v["source"]).resolve() for v in service_volumes(grafana) if v["source"].startswith(".")
    }


def provisioned_datasource() -> dict[str, Any]:
    (path,) = GRAFANA.glob("provisioning/datasources/*.yaml")
    (source,) = load_yaml(path)["datasources"]
    assert isinstance(source, dict)
    return source


def test_grafana_provisioning_folder_is_mounted() -> None:
    assert grafana_mounts()["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()


def test_grafana_dashboard_provider_points_at_the_mounted_dashboard_folder() -> None:
    (path,) = GRAFANA.glob("provisioning/dashboards/*.yaml")
    (provider,) = load_yaml(path)["providers"]
    assert provider["type"] == "file"
    folder = grafana_mounts()[provider["options"]["path"]]
    assert folder == DASHBOARD_DIR.resolve()
    assert sorted(p.name for p in folder.glob("*.json")) == ["tileserver.json"]


def test_grafana_datasource_reaches_the_prometheus_service() -> None:
    source = provisioned_datasource()
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    services = load_yaml(COMPOSE)["services"]
    assert url.hostname == "prometheus" and url.hostname in services
    listen = [a for a in services["prometheus"].get("command", []) if a.startswith("--web.listen-address=")]
    assert url.port == (int(listen[0].rsplit(":", 1)[1]) if listen else 9090)


def test_grafana_rate_interval_matches_the_scrape_interval() -> None:
    # Grafana computes $__rate_interval from timeInterval; a mismatch makes rate() windows too short.
    scrape = load_yaml(PROMETHEUS_YML)["global"]["scrape_interval"]
    assert provisioned_datasource()["jsonData"]["timeInterval"] == scrape


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uid = provisioned_datasource()["uid"]
    dashboard = json.loads((DASHBOARD_DIR / "tileserver.json").read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]


# --------------------------------------------------------------------------- the checker's own rules


@pytest.mark.parametrize(
    ("path", "patterns", "ignored"),
    [
        ("tileserver", ["**", "!tileserver/"], False),
        ("tileserver/cli.py", ["**", "!tileserver/"], False),
        ("tileserver/static/vendor", ["**", "!tileserver/", "tileserver/static/vendor/"], True),
        ("tileserver/a/__pycache__/x.pyc", ["**", "!tileserver/", "**/__pycache__/"], True),
        ("x.pyc", ["**/*.pyc"], True),
        (".venv", ["**", "!tileserver/"], True),
        ("README.md", [], False),
    ],
)
def test_dockerignore_matcher(path: str, patterns: list[str], ignored: bool) -> None:
    assert is_ignored(path, patterns) is ignored


def test_dockerfile_parser_joins_continuations_and_finds_stages(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# syntax=docker/dockerfile:1\nARG BASE=python\nFROM ${BASE} AS build\nRUN a \\\n    # note\n    && b\n"
        "FROM ${BASE}\nCOPY --from=build --chown=1:1 /x /y\nUSER 1000\n",
        encoding="utf-8",
    )
    build, final = parse_dockerfile(dockerfile)
    assert (build.name, final.name) == ("build", None)
    assert [" ".join(r.split()) for r in build.all("RUN")] == ["a && b"]
    assert copy_sources(final.all("COPY")[0]) == ({"from": "build", "chown": "1:1"}, ["/x"])
