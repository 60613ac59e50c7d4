#!/usr/bin/env bash
# Create bench/.venv-peers: open-metric-learning for the peers suite, NEVER a project dependency.
#
# The venv sees the project's .venv packages through a .pth file, so torch / torchvision / timm /
# pml / faiss are the very same installs (torch 2.14.1 from this machine's disk: nothing pulls
# another torch, which would download GBs of CUDA wheels). OML itself goes in with --no-deps:
# open-metric-learning 4.0.0 declares numpy<2.0 (the project has numpy 2.x, and a second numpy
# beside torch built for numpy 2 is what we must avoid); its modules used here import and run on
# numpy 2. The few imports OML needs that the project lacks (gdown, omegaconf — undeclared by
# OML —, matplotlib, validators) are installed into this venv only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(.venv/bin/python -c 'import sys; print(sys._base_executable)')}
OML_VERSION=${OML_VERSION:-4.0.0}
"$PY" -m venv bench/.venv-peers
SITE=$(bench/.venv-peers/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
MAIN_SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$MAIN_SITE" > "$SITE/main_venv.pth"
# check first: what would it pull? (must not list torch)
bench/.venv-peers/bin/pip install --dry-run --no-deps "open-metric-learning==$OML_VERSION" gdown omegaconf matplotlib validators
bench/.venv-peers/bin/pip install --no-deps "open-metric-learning==$OML_VERSION"
bench/.venv-peers/bin/pip install gdown omegaconf matplotlib validators
bench/.venv-peers/bin/python -c 'import torch, oml.losses, oml.samplers, oml.functional.metrics; print("OML ready, torch", torch.__version__)'
