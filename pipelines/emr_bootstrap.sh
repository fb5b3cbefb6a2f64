#!/usr/bin/env bash
# EMR bootstrap action: install ncf into a virtual environment on every node, for the Spark job's workers.
#
#   emr_bootstrap.sh WHEEL_URI
#
# WHEEL_URI: the wheel CI uploads, s3://CODE_BUCKET/ncf/wheels/ncf-VERSION-py3-none-any.whl.
# Environment (defaults for EMR; the tests override them):
#   NCF_VENV      where the environment goes (default /opt/ncf/venv; emr_step.json names it)
#   NCF_PYTHON    the interpreter to build it with (default python3.11, installed with dnf when missing)
#   NCF_PIP_ARGS  extra pip arguments, split on spaces (for example --no-index, or an index mirror)
#
# ncf goes in with its core requirements and the [spark] extra's requirements except pyspark: EMR's Spark
# puts its own pyspark on the workers' PYTHONPATH, and a pip pyspark would not match the cluster's Spark.
# A rerun on the same node reuses the environment and reinstalls the wheel.
set -euo pipefail

WHEEL_URI=${1:?usage: emr_bootstrap.sh s3://CODE_BUCKET/ncf/wheels/ncf-VERSION-py3-none-any.whl}
VENV=${NCF_VENV:-/opt/ncf/venv}
PY=${NCF_PYTHON:-python3.11}
read -r -a PIP_ARGS <<< "${NCF_PIP_ARGS:-}"
case "$WHEEL_URI" in
  s3://*.whl) ;;
  *) echo "emr_bootstrap.sh: WHEEL_URI must be an s3://...whl URI, got '$WHEEL_URI'" >&2; exit 2 ;;
esac

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
aws s3 cp --only-show-errors "$WHEEL_URI" "$WORK/"
WHEEL="$WORK/${WHEEL_URI##*/}"
[ -f "$WHEEL" ] || { echo "emr_bootstrap.sh: $WHEEL_URI was not downloaded" >&2; exit 1; }

if ! command -v "$PY" >/dev/null; then
  if command -v dnf >/dev/null; then sudo dnf install -y "$PY"  # EMR 7 (Amazon Linux 2023) ships python3.9 only
  else echo "emr_bootstrap.sh: no $PY on this node and no dnf to install it" >&2; exit 1; fi
fi

SUDO=""
if [ ! -w "$(dirname "$VENV")" ] && [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi  # bootstrap actions run as hadoop
$SUDO mkdir -p "$VENV"
$SUDO chown "$(id -u):$(id -g)" "$VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
"${PIP[@]}" install --quiet --no-deps --force-reinstall "${PIP_ARGS[@]}" "$WHEEL"
# The requirements, read from the installed wheel's metadata: unconditional ones, plus extra == "spark" but pyspark.
"$VENV/bin/python" - > "$WORK/requirements.txt" <<'PYEOF'
import importlib.metadata as md, re
for r in md.requires("ncf") or []:
    req, _, marker = (s.strip() for s in r.partition(";"))
    if not marker: print(req)
    elif re.fullmatch(r"""extra\s*==\s*["']spark["']""", marker) and not re.match(r"pyspark\b", req, re.I): print(req)
PYEOF
echo "emr_bootstrap.sh: requirements: $(tr '\n' ' ' < "$WORK/requirements.txt")"
"${PIP[@]}" install --quiet "${PIP_ARGS[@]}" -r "$WORK/requirements.txt"

cd / && "$VENV/bin/python" -c "import ncf.cli.spark, ncf.data.split; print('emr_bootstrap.sh: ncf', ncf.__version__, 'in', '$VENV')"
