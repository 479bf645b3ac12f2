#!/usr/bin/env bash
# Installs semanticist-fast into the current Python environment on a fresh machine.
#   bash scripts/install.sh          runtime (CPU torch 2.13.0, DeepSpeed, pinned) + the C++ extension
#   bash scripts/install.sh --dev    also the test dependencies, the optional extras (.[eval,dali,demo]) and, where they
#                                    are missing, Debian's Chromium + chromedriver (the demo's browser test) and slurm-wlm +
#                                    munge (the local Slurm cluster of tests/test_slurm.py), so the tests cover them
# On a CUDA machine, install your torch first, then: pip install -e .
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q -c constraints.txt"
$PIP torch==2.13.0 numpy pyyaml tqdm tensorboard safetensors pillow setuptools wheel cmake deepspeed
EXTRAS=""
if [[ "${1:-}" == "--dev" ]]; then
  $PIP -r requirements-dev.txt
  EXTRAS="[eval,dali,demo]"  # eval = torch-fidelity; dali = NVIDIA DALI, whose CPU pipeline the tests run; demo = Gradio
  if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    # The demo's browser test drives the system's headless Chromium; nothing is downloaded at test time.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
  fi
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    # launch/slurm.sbatch is tested on a one-node cluster of this machine, started by scripts/local_slurm.sh.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  fi
fi
# The extension builds against the torch just installed. No build isolation: nothing to fetch for the build
# (setup.py copes with isolation too); --use-pep517 skips setuptools' deprecated `setup.py develop` path.
$PIP --no-build-isolation --use-pep517 -e ".${EXTRAS}"
