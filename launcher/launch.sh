#!/usr/bin/env bash
# Start `gatedpo ARGS...` on every process of a job: this node's processes, one invocation per node.
#
#   launcher/launch.sh [--launcher torchrun|deepspeed] [--nproc N] [--nnodes M --node-rank I]
#                      [--rdzv-endpoint HOST:PORT] [--max-restarts K] [--hostfile FILE [--no-ssh]]
#                      [--master-addr A] [--master-port P] -- gatedpo-args...
#
# torchrun (default): N processes on this node (default: one per GPU, or 2 on a CPU host); across M nodes, run it on
# every node with the same --nnodes and --rdzv-endpoint (the c10d rendezvous on the first node) and its own
# --node-rank. --max-restarts K restarts this node's processes after a failure (with train.resume=auto the run
# continues from its latest checkpoint).
# deepspeed: --hostfile lists the nodes ("host slots=N"); DeepSpeed starts every node over ssh from the first, or,
# with --no-ssh, each node runs this script itself with its --node-rank.
# Without a GPU it selects DeepSpeed's CPU accelerator, so every process group is gloo.
set -euo pipefail
launcher=torchrun nproc="" hostfile="" addr="" port=29500 nnodes=1 node_rank=0 rdzv="" restarts=0 no_ssh=""
usage="options: --launcher --nproc --nnodes --node-rank --rdzv-endpoint --max-restarts --hostfile --no-ssh --master-addr --master-port, then -- and the gatedpo arguments"
while [ $# -gt 0 ]; do
  case "$1" in
    --launcher) launcher="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --rdzv-endpoint) rdzv="$2"; shift 2 ;;
    --max-restarts) restarts="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; launcher=deepspeed; shift 2 ;;
    --no-ssh) no_ssh=1; shift ;;
    --master-addr) addr="$2"; shift 2 ;;
    --master-port) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option '$1' ($usage)" >&2; exit 2 ;;
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
for pair in "--nproc:$nproc:1" "--nnodes:$nnodes:1" "--node-rank:$node_rank:0" "--max-restarts:$restarts:0"; do
  IFS=: read -r name value least <<< "$pair"
  case "$value" in ''|*[!0-9]*) echo "launch.sh: $name must be an integer >= $least, got '$value'" >&2; exit 2 ;; esac
  [ "$value" -ge "$least" ] || { echo "launch.sh: $name must be an integer >= $least, got '$value'" >&2; exit 2; }
done
if [ "$launcher" = torchrun ] && [ "$node_rank" -ge "$nnodes" ]; then
  echo "launch.sh: --node-rank must be below --nnodes ($nnodes), got $node_rank" >&2; exit 2
fi
if [ "$nnodes" -gt 1 ] && [ -z "$rdzv" ]; then
  echo "launch.sh: --nnodes $nnodes needs --rdzv-endpoint HOST:PORT (the first node's address, the same on every node)" >&2; exit 2
fi
if [ -n "$hostfile" ] && [ ! -f "$hostfile" ]; then
  echo "launch.sh: hostfile '$hostfile' does not exist" >&2; exit 2
fi
if [ -n "$no_ssh" ] && { [ -z "$hostfile" ] || [ -z "$addr" ]; }; then
  echo "launch.sh: --no-ssh needs --hostfile (the nodes of the job, the same file on every node) and --master-addr (the first node's address)" >&2; exit 2
fi
case "$launcher" in
  torchrun)
    if [ "$nnodes" -gt 1 ]; then
      exec torchrun --nnodes "$nnodes" --node-rank "$node_rank" --nproc-per-node "$nproc" --rdzv-backend c10d \
        --rdzv-endpoint "$rdzv" --max-restarts "$restarts" -m gatedpo_mega.cli "$@"
    fi
    # One node: the c10d rendezvous too (unlike the static one it gives each restart fresh store keys).
    exec torchrun --nnodes 1 --nproc-per-node "$nproc" --rdzv-backend c10d --rdzv-endpoint "${addr:-127.0.0.1}:$port" \
      --max-restarts "$restarts" -m gatedpo_mega.cli "$@" ;;
  deepspeed)
    if [ -n "$no_ssh" ]; then
      exec deepspeed --no_local_rank --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$addr" \
        --master_port "$port" --module gatedpo_mega.cli "$@"
    fi
    if [ -n "$hostfile" ]; then  # without --master-addr DeepSpeed asks the first host for its address over ssh
      exec deepspeed --no_local_rank --hostfile "$hostfile" ${addr:+--master_addr "$addr"} --master_port "$port" \
        --module gatedpo_mega.cli "$@"
    fi
    exec deepspeed --no_local_rank --num_gpus "$nproc" --master_port "$port" --module gatedpo_mega.cli "$@" ;;
  *) echo "launch.sh: --launcher must be torchrun or deepspeed, got '$launcher'" >&2; exit 2 ;;
esac
