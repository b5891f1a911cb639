# shellcheck shell=bash
# What every script under scripts/ci/ shares: the service list, where images
# go, the commit they are tagged with, registry and cluster credentials. The
# same scripts run under GitLab CI, GitHub Actions and on a developer's
# machine; this file is the only place that knows the difference.
#
# Sourced, never run. Callers set `set -euo pipefail` first.

# The services the pipeline builds and deploys: one Dockerfile target, one
# deploy/k8s base, one crate each.
CI_SERVICES=(gateway worker metrics-aggregator)

ci_root() { git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel 2>/dev/null || (cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); }

log() { printf '== %s: %s\n' "$(basename "$0")" "$*" >&2; }
fail() {
  printf '%s: FAILED: %s\n' "$(basename "$0")" "$*" >&2
  exit 1
}
need() { command -v "$1" >/dev/null 2>&1 || fail "$1 is not installed${2:+ ($2)}"; }

# ci_service NAME: fails unless NAME is one of CI_SERVICES.
ci_service() {
  local name=${1:-}
  for service in "${CI_SERVICES[@]}"; do
    [[ $name == "$service" ]] && return 0
  done
  fail "unknown service '${name}' (one of: ${CI_SERVICES[*]})"
}

# The commit being built: GitLab, GitHub, or the work tree's HEAD.
ci_commit_sha() {
  if [[ -n ${CI_COMMIT_SHA:-} ]]; then
    echo "$CI_COMMIT_SHA"
  elif [[ -n ${GITHUB_SHA:-} ]]; then
    echo "$GITHUB_SHA"
  else
    git rev-parse HEAD
  fi
}

# The repository URL that goes into the OCI source label.
ci_source_url() {
  if [[ -n ${CI_PROJECT_URL:-} ]]; then
    echo "$CI_PROJECT_URL"
  elif [[ -n ${GITHUB_REPOSITORY:-} ]]; then
    echo "${GITHUB_SERVER_URL:-https://github.com}/$GITHUB_REPOSITORY"
  else
    echo "https://gitlab.com/shoal/shoal"
  fi
}

# ci_image_repository SERVICE: where SERVICE's images are pushed.
#   IMAGE_REPOSITORY_BASE (a local run: e.g. 127.0.0.1:26500/shoal-pipeline),
#   else GitLab's CI_REGISTRY_IMAGE, else ghcr.io/<owner>/<repo>.
ci_image_repository() {
  local base
  if [[ -n ${IMAGE_REPOSITORY_BASE:-} ]]; then
    base=$IMAGE_REPOSITORY_BASE
  elif [[ -n ${CI_REGISTRY_IMAGE:-} ]]; then
    base=$CI_REGISTRY_IMAGE
  elif [[ -n ${GITHUB_REPOSITORY:-} ]]; then
    base="ghcr.io/${GITHUB_REPOSITORY,,}"
  else
    fail "no image registry: set IMAGE_REPOSITORY_BASE (or run under GitLab CI / GitHub Actions)"
  fi
  echo "$base/$1"
}

# The registry host of an image repository (its first path element).
ci_registry_host() { echo "${1%%/*}"; }

# ci_registry_credentials: prints "user<TAB>password" of the job's own,
# short-lived identity, or nothing (a local registry without auth). Never a
# stored password: GitLab's CI_JOB_TOKEN, GitHub's GITHUB_TOKEN.
ci_registry_credentials() {
  if [[ -n ${CI_JOB_TOKEN:-} && -n ${CI_REGISTRY:-} ]]; then
    printf '%s\t%s\n' "${CI_REGISTRY_USER:-gitlab-ci-token}" "$CI_JOB_TOKEN"
  elif [[ -n ${GITHUB_TOKEN:-} && -n ${GITHUB_ACTOR:-} ]]; then
    printf '%s\t%s\n' "$GITHUB_ACTOR" "$GITHUB_TOKEN"
  fi
}

# TLS to the registry: on, except for a loopback registry (local runs).
ci_registry_tls_verify() {
  case $(ci_registry_host "$1") in
    127.* | localhost | localhost:*) echo false ;;
    *) echo true ;;
  esac
}

# Where a build leaves what later jobs need (kept as job artifacts).
CI_OUT=${CI_OUT:-build/ci}
ci_image_ref_file() { echo "$CI_OUT/images/$1.ref"; }

# ci_tools [--all] TOOL...: the pinned tools of scripts/install-deps, from
# the repo's .venv or PATH. On a CI runner (CI=true) whose image lacks one,
# installs first: `scripts/install-deps --venv` (the PyPI tools only) for a
# job that needs nothing else, the whole `scripts/install-deps` with --all
# (the Rust jobs: cargo-nextest, cargo-deny, redis-server for the tests).
ci_tools() {
  local root all=false missing=()
  root=$(ci_root)
  if [[ ${1:-} == --all ]]; then
    all=true
    shift
  fi
  PATH="$root/.venv/bin:$HOME/.cargo/bin:${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  ((${#missing[@]} == 0)) && return 0
  if [[ ${CI:-} == true ]]; then
    if $all; then
      log "installing ${missing[*]} (scripts/install-deps)"
      "$root/scripts/install-deps" >&2
    else
      log "installing ${missing[*]} (scripts/install-deps --venv)"
      "$root/scripts/install-deps" --venv >&2
    fi
  fi
  for tool in "${missing[@]}"; do
    need "$tool" "scripts/install-deps installs it"
  done
}

# Offline (CI_OFFLINE=1, a local run on a machine that reaches no advisory
# or vulnerability database): checks that need one are skipped, loudly.
ci_offline() { [[ ${CI_OFFLINE:-0} == 1 ]]; }
