#!/usr/bin/env bash
# Run HERE (a machine with a package registry), before a device call: fetch the wheels the GPU image lacks
# (pydantic and its parts, hjson, bitsandbytes, a pure deepspeed wheel) into .whl/ (git-ignored), at the versions
# this project is tested with, for Python 3.12 on x86-64. Then name `.whl` in the device call's `carry`;
# scripts/gpu_check.sh installs them there into /tmp/site. About 50 MB (bitsandbytes alone is ~43 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
v() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  "pydantic==$(v pydantic)" "pydantic-core==$(v pydantic-core)" "annotated-types==$(v annotated-types)" \
  "typing-inspection==$(v typing-inspection)" "hjson==$(v hjson)" "bitsandbytes==$(v bitsandbytes)"
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(v deepspeed)"
ls -la .whl && du -sh .whl
