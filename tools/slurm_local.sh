#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the srun and sbatch paths (tests/test_slurm.py starts its own).
#
#   tools/slurm_local.sh install   # apt-get install slurm-wlm munge (Debian/Ubuntu, as root); skipped, saying why,
#                                  # when they are installed, without root, or without apt-get
#   tools/slurm_local.sh start     # munged, slurmctld and slurmd on this host; waits until its node is idle
#   tools/slurm_local.sh stop      # cancels the jobs, stops the three daemons
#   tools/slurm_local.sh env       # the line clients need: export SLURM_CONF=...
#
# Everything lives under $GATEDPO_SLURM_DIR (default /tmp/gatedpo-slurm): slurm.conf, a fresh munge key and
# socket, state, spool, pid and log files (log/); the system's /etc/slurm, /etc/munge and services are not used,
# and any user can start it. The node (`hostname -s`, at 127.0.0.1) claims $GATEDPO_SLURM_CPUS CPUs (default 4)
# whatever the machine has (SlurmdParameters=config_overrides), so four ranks run on a smaller machine;
# slurmctld listens on $GATEDPO_SLURM_PORT (default 16817) and slurmd on the next port. `start` installs nothing:
# without the packages it says so and exits 3.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
dir="${GATEDPO_SLURM_DIR:-/tmp/gatedpo-slurm}"
cpus="${GATEDPO_SLURM_CPUS:-4}"
ctld_port="${GATEDPO_SLURM_PORT:-16817}"  # slurmd listens on the next port
conf="$dir/slurm.conf"
node="$(hostname -s)"
export SLURM_CONF="$conf"

say() { echo "slurm_local: $*" >&2; }

missing() {  # the programs this needs that are not installed
  local p out=""
  for p in munged slurmctld slurmd srun sbatch sinfo scontrol scancel; do
    command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || out="$out $p"
  done
  echo "${out# }"
}

cmd_install() {
  if [ -z "$(missing)" ]; then say "slurm-wlm and munge are installed"; return 0; fi
  if [ "$(id -u)" != 0 ]; then say "not installing slurm-wlm and munge: not root"; return 0; fi
  if ! command -v apt-get >/dev/null 2>&1; then say "not installing slurm-wlm and munge: no apt-get"; return 0; fi
  say "installing slurm-wlm and munge with apt-get"
  local t0=$SECONDS
  local log
  log="$(mktemp)"
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurm-wlm munge; } >"$log" 2>&1; then
    tail -n 5 "$log" >&2; rm -f "$log"
    say "apt-get failed"; return 1
  fi
  rm -f "$log"
  say "installed in $((SECONDS - t0)) s"
}

write_conf() {
  cat >"$conf" <<EOF
ClusterName=gatedpo-local
SlurmctldHost=$node
SlurmctldPort=$ctld_port
SlurmdPort=$((ctld_port + 1))
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

fail() {  # the last lines of the daemons' logs, then exit 1
  say "$1"
  local f
  for f in "$dir"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done
  exit 1
}

cmd_start() {
  local gone
  gone="$(missing)"
  if [ -n "$gone" ]; then
    say "not installed: $gone (apt-get install -y slurm-wlm munge, or tools/slurm_local.sh install as root)"
    exit 3
  fi
  if alive "$dir/slurmctld.pid"; then say "already running ($conf)"; echo "export SLURM_CONF=$conf"; return 0; fi
  mkdir -p "$dir/munge" "$dir/ctld" "$dir/spool" "$dir/log"
  chmod 711 "$dir/munge"  # others may reach the socket; the key inside stays 0600
  if [ ! -f "$dir/munge/munge.key" ]; then
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 600 "$dir/munge/munge.key"
  fi
  write_conf
  # --force: the state folder may sit under a world-writable /tmp, which munged otherwise refuses.
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    2>>"$dir/log/munged.log" || fail "munged did not start"
  slurmctld -i -f "$conf" 2>>"$dir/log/slurmctld.log" || fail "slurmctld did not start"
  slurmd -f "$conf" -N "$node" 2>>"$dir/log/slurmd.log" || fail "slurmd did not start"
  local i state=""
  for i in $(seq 1 60); do
    state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
    [ "$state" = idle ] && break
    sleep 0.5
  done
  [ "$state" = idle ] || fail "node $node is '${state:-not reported}' after 30 s, not idle"
  say "node $node idle ($cpus CPUs); clients need:"
  echo "export SLURM_CONF=$conf"
}

cmd_stop() {
  if alive "$dir/slurmctld.pid"; then scancel --full --quiet --partition debug 2>/dev/null || true; fi
  local f pid
  for f in slurmd.pid slurmctld.pid munge/munged.pid; do
    if alive "$dir/$f"; then
      pid="$(cat "$dir/$f")"
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$dir/$f"
  done
  say "stopped"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: tools/slurm_local.sh install|start|stop|env" >&2; exit 2 ;;
esac
