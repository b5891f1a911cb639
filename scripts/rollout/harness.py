"""Shoal's rollout harness on the Docker engine (see docs/rollouts.md).

    harness.py pods     [--overlay DIR] [--live 30]
    harness.py compose  [--rate 400] [--job-rate 20] ...
    harness.py k8s      [--rate 400] [--job-rate 20] ...
    harness.py all      ...   (pods, then compose, then k8s; one image build)

Common options: ``--tag`` (images ``shoal-harness-<service>:<tag>``),
``--images-from TAG`` (retag ``shoal-<service>:TAG`` instead of building),
``--header 'Authorization: Bearer …'`` (sent with every request),
``--json FILE`` (the reports), ``--release`` (the release shoal-load).

Only containers and networks this run creates (label
``dev.shoal.harness.run``), loopback and the test network's bridge address
(the cluster DNS) are ever contacted; everything is removed on every exit.
Exit status: 0 when every check passed, 1 when one failed (the numbers are
printed either way), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Cleanup, HarnessError, log, remove_run_objects, repo_root  # noqa: E402
import images  # noqa: E402
from kubelet import Cluster, Manifests  # noqa: E402
from load import parse_headers, shoal_load_binary  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="harness.py", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["pods", "compose", "k8s", "all"])
    p.add_argument("--tag", default="dev", help="image tag: shoal-harness-<service>:TAG")
    p.add_argument("--images-from", help="retag shoal-<service>:TAG (built by compose-e2e) instead of building")
    p.add_argument("--no-build", action="store_true", help="run shoal-harness-<service>:TAG as they are")
    p.add_argument("--binaries", help="replace the binary of the images by the one in this directory (e.g. target/release)")
    p.add_argument("--overlay", default="deploy/k8s/overlays/dev")
    p.add_argument("--live", type=float, default=30, help="pods: seconds every pod must stay live and ready")
    p.add_argument("--rate", type=float, default=400, help="tasks per second during the load")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--job-rate", type=float, default=20, help="job submissions per second")
    p.add_argument("--min-jobs", type=int, default=1000, help="fail unless at least this many jobs were submitted")
    p.add_argument("--steady", type=float, default=10, help="seconds of steady load before the rollout")
    p.add_argument("--replicas", type=int, default=2, help="k8s: worker replicas during the rollout")
    p.add_argument("--dns-ttl", type=int, default=5, help="k8s: TTL of the cluster DNS answers (CoreDNS: 5 s)")
    p.add_argument("--endpoint-lag", type=float, default=None,
                   help="k8s: seconds before an endpoint change reaches DNS (default: the TTL, a caching resolver's worst case)")
    p.add_argument("--header", action="append", default=[], help="extra request header `name: value`")
    p.add_argument("--json", help="write the reports to this file")
    p.add_argument("--release", action="store_true", help="use target/release/shoal-load")
    args = p.parse_args(argv)
    try:
        parse_headers(args.header)
    except HarnessError as e:
        p.error(str(e))
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    root = repo_root()
    os.chdir(root)
    cleanup = Cleanup()
    cleanup.install_signal_handlers()
    run_id = f"{os.getpid()}"
    workdir = tempfile.mkdtemp(prefix="shoal-harness-")
    cleanup.push("remove the work directory", lambda: shutil.rmtree(workdir, ignore_errors=True))
    reports: dict = {}
    status = 0
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
        image_map = images.prepare(root, args.tag, args.images_from, revision, args.binaries, build=not args.no_build)
        shoal_load = shoal_load_binary(root, args.release)
        steps = ["pods", "compose", "k8s"] if args.what == "all" else [args.what]
        for step in steps:
            step_id = f"{step}-{run_id}"
            cleanup.push(f"remove the containers of {step_id}", lambda s=step_id: remove_run_objects(s))
            try:
                reports[step] = run_step(step, step_id, args, root, workdir, image_map, shoal_load, cleanup)
                reports[step]["passed"] = not reports[step].get("failures")
            except HarnessError as e:
                log(step, f"FAILED: {e}")
                reports[step] = {"passed": False, "failures": [str(e)]}
            if not reports[step]["passed"]:
                status = 1
            remove_run_objects(step_id)
    except HarnessError as e:
        log("harness", f"FAILED: {e}")
        status = 1
    finally:
        cleanup.run()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2, default=str)
    for step, report in reports.items():
        print(f"{step}: {'PASSED' if report['passed'] else 'FAILED'} {report.get('summary', '')}".rstrip())
        for failure in report.get("failures", []):
            print(f"  - {failure.splitlines()[0] if failure else failure}")
    return status


def run_step(step: str, step_id: str, args: argparse.Namespace, root: str, workdir: str,
             image_map: dict[str, str], shoal_load: str, cleanup: Cleanup) -> dict:
    step_dir = os.path.join(workdir, step)
    os.makedirs(step_dir)
    headers = parse_headers(args.header)
    if step == "pods":
        from pods import run_pods

        def factory(manifests: Manifests) -> Cluster:
            cluster = Cluster.create(step_id, step_dir, manifests, image_map, manifests.namespace(), args.dns_ttl, 0.0)
            cleanup.push("stop the cluster DNS", cluster.dns.stop)
            return cluster

        report = run_pods(root, factory, args.overlay, args.live, headers)
        return {"summary": f"{len(report.ready_after)} pods ready, live {args.live:.0f}s, all exited 0 within their grace",
                **asdict(report)}
    if step == "compose":
        from compose_rollout import run_compose

        return run_compose(step_id, args, root, step_dir, image_map, shoal_load, cleanup)
    from k8s_rollout import run_k8s

    return run_k8s(step_id, args, root, step_dir, image_map, shoal_load, cleanup)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
