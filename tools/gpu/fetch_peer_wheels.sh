#!/usr/bin/env bash
# Downloads the peer libraries the GPU benchmarks compare against (pure-Python wheels, no dependencies) into .whl/,
# an ignored folder that travels with the tree to a GPU machine without network, where tools/gpu/gpu_check.sh installs
# them offline. Run from the repository root on a development machine:
#
#     bash tools/gpu/fetch_peer_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel cut-cross-entropy trl
ls -l .whl
