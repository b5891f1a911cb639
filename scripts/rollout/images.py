"""The service images the harness runs: ``shoal-harness-<service>:<tag>``.

Either retagged from images another step already built from this commit
(``--images-from e2e``: the ``shoal-<service>:e2e`` that scripts/compose-e2e
builds, so CI compiles the workspace once) or built here with the repository's
Dockerfile, one target per service, exactly as compose does. The rollout's
second worker image is the first plus one label (same binary, a new image
id: a new pod template, as a real image bump gives).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from common import PREFIX, HarnessError, docker, image_exists, log

SERVICES = ("gateway", "worker", "metrics-aggregator")


# The classic builder, as scripts/compose-e2e uses (no buildx here).
os.environ["DOCKER_BUILDKIT"] = "0"


def local_image(service: str, tag: str) -> str:
    return f"{PREFIX}-{service}:{tag}"


def prepare(root: str, tag: str, images_from: str | None, revision: str, binaries: str | None = None,
            build: bool = True) -> dict[str, str]:
    """Makes sure ``shoal-harness-<service>:<tag>`` exists for every service;
    returns the map from the manifests' image names to them.

    ``binaries`` (a developer's shortcut, e.g. ``target/release``): the
    images of ``images_from`` (or of ``tag``) with only the binary replaced
    by the one in that directory (built on this Debian host, same glibc as
    the runtime image); everything else (user, entrypoint, labels,
    healthcheck) stays as the Dockerfile made it."""
    for service in SERVICES:
        target = local_image(service, tag)
        if binaries:
            source = f"shoal-{service}:{images_from}" if images_from else target
            if not image_exists(source):
                raise HarnessError(f"--binaries needs an image to start from: {source} does not exist")
            binary = os.path.join(binaries, f"shoal-{service}")
            if not os.access(binary, os.X_OK):
                raise HarnessError(f"--binaries: {binary} missing")
            log("images", f"{target}: {source} with {binary}")
            context = tempfile.mkdtemp(prefix="shoal-harness-context-")
            shutil.copy2(binary, context)  # the build context is this one file
            dockerfile = f"FROM {source}\nCOPY shoal-{service} /usr/local/bin/shoal-{service}\n"
            done = subprocess.run(
                ["docker", "build", "-q", "-t", target, "--label", f"org.opencontainers.image.revision={revision}",
                 "-f", "-", context],
                input=dockerfile, capture_output=True, text=True, timeout=600,
            )
            shutil.rmtree(context, ignore_errors=True)
            if done.returncode != 0:
                raise HarnessError(f"docker build of {target} from {binary}: {done.stderr.strip()[-2000:]}")
            continue
        if not build:
            if not image_exists(target):
                raise HarnessError(f"--no-build: {target} does not exist")
            continue
        if images_from:
            source = f"shoal-{service}:{images_from}"
            if not image_exists(source):
                raise HarnessError(f"--images-from {images_from}: {source} does not exist (run scripts/compose-e2e first)")
            docker("tag", source, target)
            continue
        log("images", f"docker build --target {service} -t {target}")
        done = subprocess.run(
            ["docker", "build", "-q", "--target", service, "--build-arg", f"REVISION={revision}", "-t", target, root],
            capture_output=True, text=True, timeout=3600,
        )
        if done.returncode != 0:
            raise HarnessError(f"docker build of {service}: {done.stderr.strip()[-3000:]}")
    return {f"shoal-{service}": local_image(service, tag) for service in SERVICES}


def relabelled(image: str, label: str) -> str:
    """``image`` plus one label, tagged ``<image>-<label>``."""
    target = f"{image}-{label}"
    docker("build", "-q", "-t", target, "--label", f"dev.shoal.harness.rollout={label}", "-",
           input=f"FROM {image}\n", timeout=300)
    return target
