"""Static checks of the pipeline definitions (run by `scripts/check-pipeline`).

1. `rules:changes` drift: the paths each service's jobs list are exactly what
   `cargo metadata` says the service is built from (its crate and every
   workspace crate its binary links; for its tests, the dev-dependencies too),
   and the GitHub twin's path filters are the same sets.
2. A simulator of GitLab's pipeline creation: `workflow:rules`, then each
   job's `rules` (`if:` expressions, `changes:` matched with Ruby's
   File.fnmatch(FNM_PATHNAME | FNM_DOTMATCH | FNM_EXTGLOB) semantics, through
   wcmatch), over a table of changed-file sets -> which services are tested,
   built, scanned, deployed.
3. Structure: every script is one call to an executable under scripts/ci/;
   deploy jobs are not interruptible, have an environment with a tier, a
   resource group per environment and service, an OIDC id_token, and
   production is manual; no `compare_to` can apply to a default-branch
   pipeline; `needs` always point at jobs of the same pipeline.
4. Mutations: each check above is shown to fail on a broken copy.

    python3 scripts/pipeline/check.py METADATA.json
"""

import copy
import json
import os
import re
import sys

import yaml
from wcmatch import glob as wc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SERVICES = ["gateway", "worker", "metrics-aggregator"]
# Paths every image is built from besides crates (not derived from cargo).
SHARED = [
    "Cargo.toml",
    "Cargo.lock",
    "Dockerfile",
    ".dockerignore",
    "proto/**/*",
    "deploy/k8s/base/kustomization.yaml",
    "deploy/k8s/components/**/*",
    "deploy/k8s/overlays/staging/**/*",
    "deploy/k8s/overlays/prod/**/*",
]
GITLAB_PIPELINE = [".gitlab-ci.yml", "scripts/ci/**/*"]
RESERVED = {
    "default", "include", "stages", "variables", "workflow", "image", "services",
    "cache", "before_script", "after_script", "spec",
}
DEFAULT_BRANCH = "main"


class Failure(Exception):
    pass


# --- GitLab semantics --------------------------------------------------------

# File.fnmatch?(pattern, path, File::FNM_PATHNAME | File::FNM_DOTMATCH |
# File::FNM_EXTGLOB): `*` stops at `/`, `**/` spans directories, dotfiles
# match, `{a,b}` alternates. wcmatch's globmatch is path-aware (PATHNAME);
# DOTGLOB, GLOBSTAR and BRACE are the other three.
GITLAB_FLAGS = wc.DOTGLOB | wc.BRACE | wc.GLOBSTAR


def gitlab_match(pattern, path):
    return wc.globmatch(path, pattern, flags=GITLAB_FLAGS)


def deep_merge(base, over):
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_jobs(doc):
    """Jobs with `extends` merged in (GitLab's deep merge; lists replace)."""

    def resolve(name, seen=()):
        if name in seen:
            raise Failure(f"extends cycle at {name}")
        job = doc[name]
        parents = job.get("extends", [])
        parents = [parents] if isinstance(parents, str) else parents
        merged = {}
        for parent in parents:
            merged = deep_merge(merged, resolve(parent, seen + (name,)))
        merged = deep_merge(merged, {k: v for k, v in job.items() if k != "extends"})
        return merged

    return {
        name: resolve(name)
        for name, job in doc.items()
        if name not in RESERVED and not name.startswith(".") and isinstance(job, dict)
    }


TOKEN = re.compile(r'\s*(?:(\$\w+)|"([^"]*)"|\'([^\']*)\'|(==|!=|&&|\|\||\(|\)))')


def evaluate_if(expression, variables):
    """GitLab's `rules:if` for the forms this repository uses: $VAR,
    $VAR == "value", $VAR != $OTHER, &&, ||, parentheses."""
    tokens, pos = [], 0
    while pos < len(expression.rstrip()):
        m = TOKEN.match(expression, pos)
        if not m:
            raise Failure(f"cannot parse rules:if {expression!r} at {pos}")
        pos = m.end()
        if m.group(1):
            tokens.append(("value", variables.get(m.group(1)[1:])))
        elif m.group(2) is not None or m.group(3) is not None:
            tokens.append(("value", m.group(2) if m.group(2) is not None else m.group(3)))
        else:
            tokens.append(("op", m.group(4)))

    def primary(i):
        kind, value = tokens[i]
        if (kind, value) == ("op", "("):
            result, i = disjunction(i + 1)
            return result, i + 1
        if i + 1 < len(tokens) and tokens[i + 1] in (("op", "=="), ("op", "!=")):
            right = tokens[i + 2][1]
            equal = value == right
            return (equal if tokens[i + 1][1] == "==" else not equal), i + 3
        return bool(value), i + 1

    def conjunction(i):
        result, i = primary(i)
        while i < len(tokens) and tokens[i] == ("op", "&&"):
            right, i = primary(i + 1)
            result = result and right
        return result, i

    def disjunction(i):
        result, i = conjunction(i)
        while i < len(tokens) and tokens[i] == ("op", "||"):
            right, i = conjunction(i + 1)
            result = result or right
        return result, i

    result, end = disjunction(0)
    if end != len(tokens):
        raise Failure(f"trailing tokens in rules:if {expression!r}")
    return result


def context(kind, files):
    """Predefined variables and the changed files of one kind of pipeline."""
    base = {"CI_DEFAULT_BRANCH": DEFAULT_BRANCH}
    if kind == "merge_request":
        base |= {"CI_PIPELINE_SOURCE": "merge_request_event", "CI_MERGE_REQUEST_IID": "7",
                 "CI_MERGE_REQUEST_TARGET_BRANCH_NAME": DEFAULT_BRANCH}
    elif kind == "default_branch":
        base |= {"CI_PIPELINE_SOURCE": "push", "CI_COMMIT_BRANCH": DEFAULT_BRANCH}
    elif kind == "branch_with_mr":
        base |= {"CI_PIPELINE_SOURCE": "push", "CI_COMMIT_BRANCH": "feature",
                 "CI_OPEN_MERGE_REQUESTS": "shoal/shoal!7"}
    elif kind == "branch":
        base |= {"CI_PIPELINE_SOURCE": "push", "CI_COMMIT_BRANCH": "feature"}
    elif kind == "tag":
        base |= {"CI_PIPELINE_SOURCE": "push", "CI_COMMIT_TAG": "v1.2.0"}
    else:
        raise Failure(f"unknown pipeline kind {kind}")
    return {"variables": base, "files": list(files), "kind": kind}


def changes_match(changes, ctx):
    # No Git push to compare with (tags, schedules, ...): always true.
    if ctx["kind"] == "tag":
        return True
    paths = changes["paths"] if isinstance(changes, dict) else changes
    return any(gitlab_match(p, f) for p in paths for f in ctx["files"])


def evaluate_rules(rules, ctx):
    """The `when:` of the first matching rule, or None (not in the pipeline)."""
    for rule in rules:
        if "if" in rule and not evaluate_if(rule["if"], ctx["variables"]):
            continue
        if "changes" in rule and not changes_match(rule["changes"], ctx):
            continue
        when = rule.get("when", "on_success")
        return None if when == "never" else when
    return None


def simulate(doc, ctx):
    """{job name: when} of the pipeline GitLab would create, or None."""
    if evaluate_rules(doc.get("workflow", {}).get("rules", [{}]), ctx) is None:
        return None
    pipeline = {}
    for name, job in resolve_jobs(doc).items():
        when = evaluate_rules(job["rules"], ctx) if "rules" in job else job.get("when", "on_success")
        if when is not None:
            pipeline[name] = when
    jobs = resolve_jobs(doc)
    for name in pipeline:
        for need in jobs[name].get("needs", []):
            need = need["job"] if isinstance(need, dict) else need
            if need not in pipeline:
                raise Failure(f"{name} needs {need}, which is not in this pipeline (GitLab refuses it)")
    return pipeline


# --- the table ------------------------------------------------------------------

ALL = set(SERVICES)
G, W, A = "gateway", "worker", "metrics-aggregator"
# (name, pipeline kind, changed files, tested, built (and scanned), deployed,
#  GitHub workflows triggered)
TABLE = [
    ("docs only", "default_branch", ["docs/api.md", "README.md"], set(), set(), set(), set()),
    ("docs only, merge request", "merge_request", ["docs/jobs.md"], set(), set(), set(), set()),
    ("gateway crate", "default_branch", ["crates/gateway/src/routes/jobs.rs"], {G}, {G}, {G}, {G}),
    ("worker crate: gateway tests use the worker", "default_branch", ["crates/worker/src/queue.rs"],
     {W, G}, {W}, {W}, {W, G}),
    ("aggregator crate, merge request: no deploy", "merge_request", ["crates/metrics-aggregator/src/lib.rs"],
     {A, G}, {A}, set(), {A, G}),
    ("telemetry: every service links it", "default_branch", ["crates/telemetry/src/grpc.rs"], ALL, ALL, ALL, ALL),
    ("proto sources", "merge_request", ["proto/shoal/worker/v1/worker.proto"], ALL, ALL, set(), ALL),
    ("proto crate", "default_branch", ["crates/proto/build.rs"], ALL, ALL, ALL, ALL),
    ("Cargo.lock", "default_branch", ["Cargo.lock"], ALL, ALL, ALL, ALL),
    ("Dockerfile", "default_branch", ["Dockerfile"], ALL, ALL, ALL, ALL),
    ("one service's k8s base", "default_branch", ["deploy/k8s/base/worker/deployment.yaml"], {W}, {W}, {W}, {W}),
    ("a shared k8s component", "default_branch", ["deploy/k8s/components/redis/statefulset.yaml"],
     ALL, ALL, ALL, ALL),
    ("the dev overlay is not deployed by the pipeline", "default_branch",
     ["deploy/k8s/overlays/dev/kustomization.yaml"], set(), set(), set(), set()),
    ("testkit: tests only, nothing built", "default_branch", ["crates/testkit/src/lib.rs"], ALL, set(), set(), ALL),
    ("bench: nothing", "default_branch", ["crates/bench/src/main.rs", "scripts/bench"], set(), set(), set(), set()),
    ("the pipeline file: all tested and built, nothing deployed", "default_branch", [".gitlab-ci.yml"],
     ALL, ALL, set(), set()),
    ("a CI script", "merge_request", ["scripts/ci/deploy"], ALL, ALL, set(), ALL),
    ("a dotfile inside a crate (FNM_DOTMATCH)", "default_branch", ["crates/gateway/tests/.fixtures/key"],
     {G}, {G}, {G}, {G}),
    ("two services' crates", "default_branch", ["crates/gateway/src/main.rs", "crates/metrics-aggregator/src/lib.rs"],
     {G, A}, {G, A}, {G, A}, {G, A}),
    ("tag: everything built, nothing deployed", "tag", ["README.md"], ALL, ALL, set(), None),
]
# Pushes that must not create a pipeline at all.
NO_PIPELINE = [
    ("a branch with an open merge request: only the MR pipeline", "branch_with_mr", ["crates/gateway/src/main.rs"]),
    ("a branch without a merge request", "branch", ["crates/gateway/src/main.rs"]),
]


def services_of(pipeline, stage):
    return {name.split(":", 1)[1] for name in pipeline if name.startswith(stage + ":")}


def run_table(doc, workflows, quiet=False):
    errors = []
    rows = []
    for name, kind, files, tested, built, deployed, github in TABLE:
        try:
            pipeline = simulate(doc, context(kind, files))
        except Failure as e:
            errors.append(f"{name}: {e}")
            continue
        if pipeline is None:
            errors.append(f"{name}: no pipeline created")
            continue
        got = {
            "test": services_of(pipeline, "test"),
            "build": services_of(pipeline, "build"),
            "scan": services_of(pipeline, "scan"),
            "deploy-staging": services_of(pipeline, "deploy-staging"),
            "deploy-production": services_of(pipeline, "deploy-production"),
        }
        want = {"test": tested, "build": built, "scan": built, "deploy-staging": deployed,
                "deploy-production": deployed}
        for stage in want:
            if got[stage] != want[stage]:
                errors.append(f"{name}: {stage} runs {sorted(got[stage])}, expected {sorted(want[stage])}")
        manual = {j for j, w in pipeline.items() if j.startswith("deploy-production:") and w != "manual"}
        if manual:
            errors.append(f"{name}: production deploys not manual: {sorted(manual)}")
        if "lint" not in pipeline:
            errors.append(f"{name}: no lint job")
        if github is not None and kind in ("default_branch", "merge_request"):
            triggered = {s for s in SERVICES if github_triggered(workflows[s], files)}
            if triggered != github:
                errors.append(f"{name}: GitHub runs {sorted(triggered)}, expected {sorted(github)}")
        rows.append((name, kind, got))
    for name, kind, files in NO_PIPELINE:
        if simulate(doc, context(kind, files)) is not None:
            errors.append(f"{name}: a pipeline was created")
    if not quiet and not errors:
        width = max(len(r[0]) for r in rows)
        print(f"  {'case':<{width}}  {'pipeline':<14}  test / build+scan / deploy")
        for name, kind, got in rows:
            fmt = lambda s: ",".join(x[0] if x != "metrics-aggregator" else "a" for x in sorted(s)) or "-"
            print(f"  {name:<{width}}  {kind:<14}  {fmt(got['test']):<6} / {fmt(got['build']):<6} / "
                  f"{fmt(got['deploy-staging'])}")
        for name, _, _ in NO_PIPELINE:
            print(f"  {name:<{width}}  (no pipeline)")
    return errors, len(rows) + len(NO_PIPELINE)


# --- GitHub path filters ------------------------------------------------------------

# GitHub's filter patterns: `*` stops at `/`, `**` spans directories, dotfiles match.
GITHUB_FLAGS = wc.DOTGLOB | wc.GLOBSTAR


def github_paths(workflow):
    on = workflow.get("on") or workflow.get(True)
    return on["pull_request"]["paths"], on["push"]["paths"]


def github_triggered(workflow, files):
    pr, push = github_paths(workflow)
    return any(wc.globmatch(f, p, flags=GITHUB_FLAGS) for p in push for f in files)


# --- cargo metadata -> what each service is built from -------------------------------


def workspace_graph(metadata):
    """{crate: (directory, {normal+build deps}, {dev deps})} over workspace crates."""
    members = {p["name"]: p for p in metadata["packages"] if p["id"] in metadata["workspace_members"]}
    graph = {}
    for name, package in members.items():
        directory = os.path.relpath(os.path.dirname(package["manifest_path"]), metadata["workspace_root"])
        normal, dev = set(), set()
        for dep in package["dependencies"]:
            if dep["name"] in members:
                (dev if dep.get("kind") == "dev" else normal).add(dep["name"])
        graph[name] = (directory, normal, dev)
    return graph


def closure(graph, roots):
    seen, stack = set(), list(roots)
    while stack:
        crate = stack.pop()
        if crate not in seen:
            seen.add(crate)
            stack.extend(graph[crate][1])
    return seen


def expected_paths(graph, service):
    crate = f"shoal-{service}"
    if crate not in graph:
        raise Failure(f"no workspace crate {crate}")
    linked = closure(graph, [crate])
    tested = closure(graph, [crate] + sorted(graph[crate][2])) - linked
    image = {f"{graph[c][0]}/**/*" for c in linked} | {f"deploy/k8s/base/{service}/**/*"}
    tests = {f"{graph[c][0]}/**/*" for c in tested}
    return image, tests


def rule_paths(job):
    paths = set()
    for rule in job.get("rules", []):
        changes = rule.get("changes")
        if changes is not None:
            paths |= set(changes["paths"] if isinstance(changes, dict) else changes)
    return paths


def check_drift(doc, workflows, metadata):
    errors = []
    graph = workspace_graph(metadata)
    jobs = resolve_jobs(doc)
    shared, pipeline = set(SHARED), set(GITLAB_PIPELINE)
    for service in SERVICES:
        image, tests = expected_paths(graph, service)
        for stage, want in [("build", image | shared | pipeline), ("scan", image | shared | pipeline),
                            ("test", image | tests | shared | pipeline),
                            ("deploy-staging", image | shared), ("deploy-production", image | shared)]:
            name = f"{stage}:{service}"
            if name not in jobs:
                errors.append(f"no job {name}")
                continue
            got = rule_paths(jobs[name])
            for missing in sorted(want - got):
                errors.append(f"{name}: rules:changes lacks {missing} (cargo metadata / shared inputs)")
            for extra in sorted(got - want):
                errors.append(f"{name}: rules:changes lists {extra}, which {service} is not built from")
        # The GitHub twin: the same sets (GitHub's `dir/**` is GitLab's `dir/**/*`),
        # its own workflow files in place of .gitlab-ci.yml.
        want = {p[: -len("/*")] if p.endswith("/**/*") else p for p in image | tests | shared}
        want |= {"scripts/ci/**", ".github/workflows/service.yml", f".github/workflows/{service}.yml"}
        for trigger, got in zip(("pull_request", "push"), github_paths(workflows[service])):
            for missing in sorted(want - set(got)):
                errors.append(f".github/workflows/{service}.yml {trigger}: paths lack {missing}")
            for extra in sorted(set(got) - want):
                errors.append(f".github/workflows/{service}.yml {trigger}: paths list {extra}")
    return errors


# --- structure -------------------------------------------------------------------------


def check_structure(doc):
    errors = []
    jobs = resolve_jobs(doc)
    default_interruptible = doc.get("default", {}).get("interruptible", False)
    default_ctx = context("default_branch", [])
    for name, job in jobs.items():
        script = job.get("script", [])
        if len(script) != 1 or not re.fullmatch(r'scripts/ci/[\w-]+( "\$\w+")*( \w+)?', script[0]):
            errors.append(f"{name}: script must be one call to scripts/ci/<file>, is {script}")
        else:
            path = os.path.join(ROOT, script[0].split()[0])
            if not os.access(path, os.X_OK):
                errors.append(f"{name}: {script[0].split()[0]} is not an executable file")
        for key in ("before_script", "after_script"):
            if key in job:
                errors.append(f"{name}: {key} is logic in YAML")
        deploy = name.startswith("deploy-")
        interruptible = job.get("interruptible", default_interruptible)
        if deploy == interruptible:
            errors.append(f"{name}: interruptible is {interruptible}")
        for rule in job.get("rules", []):
            changes = rule.get("changes")
            if isinstance(changes, dict) and "compare_to" in changes:
                if "if" not in rule or evaluate_if(rule["if"], default_ctx["variables"]):
                    errors.append(f"{name}: compare_to {changes['compare_to']} in a rule that can match a "
                                  "default-branch pipeline (main against main: nothing would ever run)")
        if deploy:
            stage, service = name.split(":", 1)
            env = stage[len("deploy-"):]
            environment = job.get("environment", {})
            if environment.get("name") != f"{env}/{service}" or environment.get("deployment_tier") != env:
                errors.append(f"{name}: environment {environment}")
            if job.get("resource_group") != f"{env}-{service}":
                errors.append(f"{name}: resource_group {job.get('resource_group')}")
            if not job.get("id_tokens"):
                errors.append(f"{name}: no OIDC id_tokens")
            for rule in job.get("rules", []):
                if rule.get("if") != "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH":
                    errors.append(f"{name}: a rule not limited to the default branch: {rule}")
                if env == "production" and rule.get("when") != "manual":
                    errors.append(f"{name}: production rule not manual: {rule}")
            if f"build:{service}" not in job.get("needs", []):
                errors.append(f"{name}: does not need build:{service} (the digest artifact)")
    return errors


# --- mutations: every check above must fail on a broken copy ---------------------------


def mutations(doc, workflows, metadata):
    def without(anchor_list, item):
        anchor_list.remove(item)

    out = []

    d = copy.deepcopy(doc)
    without(d[".paths"]["gateway"], "crates/telemetry/**/*")
    # The anchors were resolved on load: mutate the jobs' copies as well.
    for name in ("test:gateway", "build:gateway", "scan:gateway", "deploy-staging:gateway",
                 "deploy-production:gateway"):
        for rule in d[name]["rules"]:
            if isinstance(rule.get("changes"), list) and "crates/telemetry/**/*" in rule["changes"]:
                rule["changes"] = [p for p in rule["changes"] if p != "crates/telemetry/**/*"]
    out.append(("gateway's changes lose crates/telemetry", check_drift(d, workflows, metadata)
                + run_table(d, workflows, quiet=True)[0]))

    m = copy.deepcopy(metadata)
    worker = next(p for p in m["packages"] if p["name"] == "shoal-worker")
    worker["dependencies"].append({"name": "shoal-testkit", "kind": None, "path": "crates/testkit"})
    out.append(("cargo graph: worker links testkit", check_drift(doc, workflows, m)))

    w = copy.deepcopy(workflows)
    for trigger in ("pull_request", "push"):
        paths = (w["worker"].get("on") or w["worker"][True])[trigger]["paths"]
        paths[:] = [p for p in paths if p != "Cargo.lock"]
    out.append(("GitHub worker.yml loses Cargo.lock", check_drift(doc, w, metadata)))

    d = copy.deepcopy(doc)
    for rule in d["deploy-staging:worker"]["rules"]:
        rule["changes"] = {"paths": rule["changes"], "compare_to": "refs/heads/main"}
    out.append(("compare_to main on a default-branch deploy", check_structure(d)))

    d = copy.deepcopy(doc)
    d["deploy-production:gateway"]["rules"][0].pop("when")
    out.append(("production not manual", check_structure(d) + run_table(d, workflows, quiet=True)[0]))

    d = copy.deepcopy(doc)
    d["workflow"]["rules"] = [r for r in d["workflow"]["rules"] if r.get("when") != "never"]
    for rule in d["workflow"]["rules"]:
        if rule.get("if") == "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH":
            rule["if"] = "$CI_COMMIT_BRANCH"
    out.append(("branch pipelines on every branch, beside the MR pipeline", run_table(d, workflows, quiet=True)[0]))

    d = copy.deepcopy(doc)
    d["deploy-staging:gateway"]["interruptible"] = True
    d["build:worker"]["script"] = ["cd crates && cargo build"]
    out.append(("interruptible deploy, logic in YAML", check_structure(d)))

    d = copy.deepcopy(doc)
    d["build:worker"]["rules"] = [{"if": "$CI_COMMIT_TAG"}]
    out.append(("a build job with fewer rules than its deploy", run_table(d, workflows, quiet=True)[0]))
    return out


def main():
    with open(sys.argv[1]) as f:
        metadata = json.load(f)
    with open(os.path.join(ROOT, ".gitlab-ci.yml")) as f:
        doc = yaml.safe_load(f)
    workflows = {}
    for service in SERVICES:
        with open(os.path.join(ROOT, ".github", "workflows", f"{service}.yml")) as f:
            workflows[service] = yaml.safe_load(f)

    failed = False
    for title, errors in [("rules:changes match the cargo metadata graph", check_drift(doc, workflows, metadata)),
                          ("pipeline structure", check_structure(doc))]:
        if errors:
            failed = True
            print(f"  FAIL {title}:\n" + "\n".join(f"       {e}" for e in errors))
        else:
            print(f"  ok  {title}")
    graph = workspace_graph(metadata)
    for service in SERVICES:
        image, tests = expected_paths(graph, service)
        print(f"       {service}: built from {sorted(p.split('/**')[0] for p in image)}; "
              f"tests also use {sorted(p.split('/**')[0] for p in tests) or '-'}")

    errors, cases = run_table(doc, workflows)
    if errors:
        failed = True
        print("  FAIL rules:changes simulator:\n" + "\n".join(f"       {e}" for e in errors))
    else:
        print(f"  ok  rules:changes simulator: {cases} cases")

    caught = 0
    for title, errors in mutations(doc, workflows, metadata):
        if errors:
            caught += 1
        else:
            failed = True
            print(f"  FAIL mutation not caught: {title}")
    print(f"  ok  {caught} mutations caught by the checks")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
