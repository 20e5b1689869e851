#!/bin/bash
# Single- or multi-node launch with torchrun (outside SLURM). Lightning picks up torchrun's environment.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash docker/torchrun.sh recipes/edm/cifar10_cond_lora.yaml
set -euo pipefail
RECIPE=${1:-recipes/classifier/digits.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m plpriv fit -c "$RECIPE" \
    --trainer.accelerator gpu --trainer.devices "$GPUS_PER_NODE" --trainer.num_nodes "${NNODES:-1}" \
    --trainer.strategy ddp --ckpt_path last
