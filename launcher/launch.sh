#!/usr/bin/env bash
# Start `gatedpo ARGS...` on every process of a job.
#
#   launcher/launch.sh [--launcher torchrun|deepspeed] [--nproc N] [--hostfile FILE] [--master-addr A]
#                      [--master-port P] -- gatedpo-args...
#
# Single node by default (N processes, default: one per GPU, or 2 on a CPU host); with --hostfile, multi-node
# through the DeepSpeed launcher (hostfile lines: "host slots=N"). Without a GPU it selects DeepSpeed's CPU
# accelerator, so every process group is gloo.
set -euo pipefail
launcher=torchrun nproc="" hostfile="" addr=127.0.0.1 port=29500
while [ $# -gt 0 ]; do
  case "$1" in
    --launcher) launcher="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; launcher=deepspeed; shift 2 ;;
    --master-addr) addr="$2"; shift 2 ;;
    --master-port) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option '$1' (options: --launcher --nproc --hostfile --master-addr --master-port, then -- and the gatedpo arguments)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "launch.sh: no gatedpo arguments after --" >&2; exit 2; }
if nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
else
  gpus=0
  export DS_ACCELERATOR=cpu
fi
[ -n "$nproc" ] || nproc=$(( gpus > 0 ? gpus : 2 ))
case "$nproc" in ''|*[!0-9]*|0) echo "launch.sh: --nproc must be a positive integer, got '$nproc'" >&2; exit 2 ;; esac
if [ -n "$hostfile" ] && [ ! -f "$hostfile" ]; then
  echo "launch.sh: hostfile '$hostfile' does not exist" >&2; exit 2
fi
case "$launcher" in
  torchrun)
    exec torchrun --nproc-per-node "$nproc" --master-addr "$addr" --master-port "$port" -m gatedpo_mega.cli "$@" ;;
  deepspeed)
    if [ -n "$hostfile" ]; then
      exec deepspeed --no_local_rank --hostfile "$hostfile" --master_addr "$addr" --master_port "$port" --module gatedpo_mega.cli "$@"
    fi
    exec deepspeed --no_local_rank --num_gpus "$nproc" --master_port "$port" --module gatedpo_mega.cli "$@" ;;
  *) echo "launch.sh: --launcher must be torchrun or deepspeed, got '$launcher'" >&2; exit 2 ;;
esac
