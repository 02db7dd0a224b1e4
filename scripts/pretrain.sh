#!/usr/bin/env bash
# `make pretrain`: inside a SLURM allocation, one task per GPU through srun (Lightning's
# SLURMEnvironment picks the job up); outside, all local GPUs through Lightning's DDP launcher,
# or the CPU when there is no GPU. CONFIG (one file, or several separated by spaces, given to msrl as
# repeated -c: "configs/pretrain/base.yaml configs/pretrain/brats2019.yaml") and GPUS come from the
# Makefile; extra arguments pass on.
set -euo pipefail
CONFIG=${CONFIG:-configs/pretrain/template.yaml}
configs=()
for file in $CONFIG; do
  [ -f "$file" ] || { echo "make pretrain: CONFIG file $file does not exist" >&2; exit 2; }
  configs+=(-c "$file")
done
local_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ -n "${SLURM_JOB_ID:-}" ]; then
  GPUS=${GPUS:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$local_gpus}}}
  GPUS=${GPUS%%(*}  # SLURM writes e.g. "4(x2)"
  nodes=${SLURM_NNODES:-1}
  echo "SLURM job $SLURM_JOB_ID: $nodes node(s) x $GPUS GPU(s), config $CONFIG"
  exec srun --ntasks-per-node="$GPUS" --kill-on-bad-exit=1 \
    msrl pretrain "${configs[@]}" --trainer.accelerator gpu --trainer.devices "$GPUS" \
    --trainer.num_nodes "$nodes" "$@"
fi
GPUS=${GPUS:-$local_gpus}
if [ "$GPUS" -gt 0 ]; then
  echo "local run on $GPUS GPU(s), config $CONFIG"
  exec msrl pretrain "${configs[@]}" --trainer.accelerator gpu --trainer.devices "$GPUS" "$@"
fi
echo "no GPU found: CPU run, config $CONFIG"
exec msrl pretrain "${configs[@]}" "$@"
