#!/bin/bash
# LLaVA-1.5 stage 2 (LoRA on Vicuna-7B, ZeRO-3) on 2 nodes x 8 GPUs under SLURM, with torchrun.
#   sbatch docs/slurm_llava_finetune.sh                      # or: RECIPE=recipes/... sbatch ...
# One torchrun per node starts that node's 8 ranks; node 0 is the rendezvous host.
# The job is requeued after preemption or a node failure and resumes from the newest complete
# checkpoint (--resume_from_checkpoint auto: a fresh start when there is none yet).
# Needs: the repository and its environment at the same path on every node, and output_dir on a
# filesystem shared by all nodes (DeepSpeed writes each rank's shards into one checkpoint folder).
#SBATCH --job-name=llava-lora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source .venv/bin/activate

RECIPE=${RECIPE:-recipes/llava_finetune_lora.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # download models once, before the job

# Global batch = nodes x GPUs x per_device_train_batch_size x gradient_accumulation_steps:
# 2 x 8 x 16 x 1 = 256 here; halve gradient_accumulation_steps or the batch for LLaVA's 128.
srun --kill-on-bad-exit=1 bash -c '
  torchrun \
    --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node '"$GPUS_PER_NODE"' \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m lvlm_tune.train '"$RECIPE"' \
    --deepspeed ds_configs/zero3.json --resume_from_checkpoint auto
'
