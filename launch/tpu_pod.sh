#!/usr/bin/env bash
# Multi-host training on a Cloud TPU pod slice: the same command on every host.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE [CONFIG] [WORKDIR]
#
# jax.distributed.initialize() discovers the coordinator, process count and process id
# on TPU VMs, so launch/train.py needs no extra flags there. WORKDIR should be shared
# storage (a gs:// bucket) so every host writes its part of each orbax checkpoint to the
# same place; rerunning this script resumes the run.
set -euo pipefail
TPU_NAME=${1:?usage: tpu_pod.sh TPU_NAME ZONE [CONFIG] [WORKDIR]}
ZONE=${2:?zone, e.g. us-central2-b}
CONFIG=${3:-configs/lm_base.py}
WORKDIR=${4:-gs://YOUR_BUCKET/sparsity_jax/lm_base}
REPO=${REPO:-~/sparsity_jax}

# 1. Copy the code to every host and install it (jax[tpu] brings libtpu).
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU_NAME:$REPO"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd $REPO && python3.12 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"

# 2. Train: one process per host, all started together.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd $REPO && .venv/bin/python launch/train.py --config=$CONFIG --workdir=$WORKDIR"
