#!/usr/bin/env bash
# The workflow on a real, throwaway one-node SLURM cluster on this host.
#
#   bash tests/slurm/run_slurm_test.sh        (from the repository root, as root)
#
# Installs slurm-wlm and munge from Debian if missing, starts a private munged, slurmctld
# and slurmd (state, spool, logs and key in a temporary folder, loopback ports only; the
# configuration is linked to /etc/slurm/slurm.conf for the run and unlinked after),
# runs the tiny workflow locally for reference and then with `--profile profiles/slurm`,
# preempts the QAT job mid-training (SLURM requeues it, it resumes from its last epoch),
# checks SLURM's job records and logs and compares the outputs with the local run's,
# submits QAT once more with the profile's GPU switch on, then stops the daemons it
# started by their process ids and removes the temporary folder.
#
# Environment: N6QAT_SLURM_KEEP=1 keeps the temporary folder; N6QAT_SLURM_DAEMON_TIMEOUT
# (s, default 60) and N6QAT_SLURM_RUN_TIMEOUT (s, default 1500) bound the waits.
set -euo pipefail

START=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/tests/slurm"
VENV="${VENV:-$ROOT/.venv}"
DAEMON_TIMEOUT="${N6QAT_SLURM_DAEMON_TIMEOUT:-60}"
RUN_TIMEOUT="${N6QAT_SLURM_RUN_TIMEOUT:-1500}"
CONFIGS=("$ROOT/tests/config/tiny.yaml" "$HERE/preemptible.yaml")
SYSTEM_CONF=/etc/slurm/slurm.conf
WORK=""
LINKED_CONF=0
DAEMON_PIDS=()
STATUS=1

say() { echo "[slurm-test $((SECONDS - START))s] $*"; }
fail() {
    echo "[slurm-test] FAIL: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------- setup

require_tools() {
    [ "$(id -u)" = 0 ] ||
        fail "run as root: slurmd starts jobs as their user and packages may need installing"
    [ -x "$VENV/bin/snakemake" ] || fail "no $VENV/bin/snakemake: run 'make setup' first"
    local missing=()
    for tool in munged munge slurmctld slurmd sbatch squeue scontrol sinfo; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} = 0 ] && return
    command -v apt-get >/dev/null ||
        fail "missing ${missing[*]} and no apt-get to install slurm-wlm and munge"
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    # Keep the packages' own services from starting: this test runs private daemons.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends slurm-wlm munge >/dev/null; } || rc=$?
    [ "$made_policy" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || fail "apt-get install slurm-wlm munge failed (exit $rc)"
}

# A run killed with SIGKILL leaves its folder, daemons and workflow run behind: stop the
# processes of those whose owner script is gone (found by the folder's unique path in
# their command line), then remove the folder.
reap_stale_runs() {
    local dir cmdline pid
    for dir in "${TMPDIR:-/tmp}"/n6qat-slurm.*; do
        [ -f "$dir/owner.pid" ] || continue
        kill -0 "$(cat "$dir/owner.pid")" 2>/dev/null && continue
        for cmdline in /proc/[0-9]*/cmdline; do
            pid=${cmdline#/proc/}
            pid=${pid%/cmdline}
            if tr '\0' ' ' <"$cmdline" 2>/dev/null | grep -qF "$dir/"; then
                kill -9 "$pid" 2>/dev/null || true
            fi
        done
        say "stopped and removed the leftovers of an earlier run: $dir"
        rm -rf "$dir"
    done
}

free_ports() { # three free loopback ports, space separated
    "$VENV/bin/python" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_config() {
    local host cpus memory ports
    host=$(hostname -s)
    getent hosts "$host" | grep -q '^127\.' ||
        fail "hostname $host does not resolve to a loopback address (add it to /etc/hosts)"
    cpus=$(nproc)
    memory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))
    ((memory < 16384)) && memory=16384 # the profile asks 16 GB for training jobs
    read -r -a ports <<<"$(free_ports)"
    mkdir -p "$WORK"/{etc,munge,keys,state,spool,run,log}
    chmod 700 "$WORK/keys"
    sed -e "s|@DIR@|$WORK|g" -e "s|@HOST@|$host|g" -e "s|@USER@|$(id -un)|g" \
        -e "s|@CTLD_PORT@|${ports[0]}|" -e "s|@SLURMD_PORT@|${ports[1]}|" \
        -e "s|@CPUS@|$cpus|" -e "s|@MEMORY@|$memory|" \
        "$HERE/slurm.conf.in" >"$WORK/etc/slurm.conf"
    echo "NodeName=$host Name=gpu File=/dev/null" >"$WORK/etc/gres.conf" # a stand-in device
    : >"$WORK/plugstack.conf"
    export SLURM_CONF="$WORK/etc/slurm.conf"
    CPUS=$cpus
}

# srun inside the jobs reads the default path: the jobstep plugin drops SLURM_* variables,
# SLURM_CONF too, from the environment it starts srun with.
link_system_conf() {
    if [ -L "$SYSTEM_CONF" ] && [ ! -e "$SYSTEM_CONF" ]; then
        rm -f "$SYSTEM_CONF" # left by a killed run
    fi
    if [ -e "$SYSTEM_CONF" ]; then
        fail "$SYSTEM_CONF exists (-> $(readlink -f "$SYSTEM_CONF")): another SLURM test" \
            "is running or this host has its own SLURM; the test needs that path"
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$SLURM_CONF" "$SYSTEM_CONF"
    LINKED_CONF=1
}

unlink_system_conf() {
    if [ "$LINKED_CONF" = 1 ] && [ "$(readlink "$SYSTEM_CONF")" = "$SLURM_CONF" ]; then
        rm -f "$SYSTEM_CONF"
    fi
    LINKED_CONF=0
}

# ---------------------------------------------------------------------------- daemons

wait_until() { # wait_until SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$WORK"/log/*.log "$WORK"/log/*.out >&2 2>/dev/null || true
            fail "$what did not come up within ${limit}s (logs above)"
        fi
        sleep 0.5
    done
}

start_daemon() { # start_daemon NAME COMMAND...: run in the background, record its pid
    local name=$1
    shift
    "$@" >"$WORK/log/$name.out" 2>&1 &
    local pid=$!
    DAEMON_PIDS+=("$pid")
    say "started $name (pid $pid)"
}

munge_works() { munge -n -S "$WORK/munge/munge.socket" | unmunge -S "$WORK/munge/munge.socket"; }
node_idle() { [ "$(sinfo -h -N -p test -o %t)" = idle ]; }

start_cluster() {
    head -c 1024 /dev/urandom >"$WORK/keys/munge.key"
    chmod 400 "$WORK/keys/munge.key"
    start_daemon munged munged --foreground --force --socket="$WORK/munge/munge.socket" \
        --key-file="$WORK/keys/munge.key" --pid-file="$WORK/run/munged.pid" \
        --seed-file="$WORK/keys/munged.seed" --log-file="$WORK/log/munged.log"
    wait_until "$DAEMON_TIMEOUT" munged munge_works
    start_daemon slurmctld slurmctld -D -i -f "$SLURM_CONF"
    wait_until "$DAEMON_TIMEOUT" slurmctld scontrol ping
    start_daemon slurmd slurmd -D -f "$SLURM_CONF"
    wait_until "$DAEMON_TIMEOUT" "slurmd (node idle in sinfo)" node_idle
    say "cluster up: $(sinfo -h -o '%P %a %D %t %C' | tr '\n' ';')"
}

stop_cluster() {
    [ ${#DAEMON_PIDS[@]} = 0 ] && return
    if [ -n "${SLURM_CONF:-}" ] && kill -0 "${DAEMON_PIDS[1]:-0}" 2>/dev/null; then
        scancel --user="$(id -un)" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while [ -n "$(squeue -h -t running,completing 2>/dev/null)" ] && ((SECONDS < deadline)); do
            sleep 0.5
        done
    fi
    local i pid
    for ((i = ${#DAEMON_PIDS[@]} - 1; i >= 0; i--)); do # slurmd, slurmctld, munged
        pid=${DAEMON_PIDS[i]}
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    DAEMON_PIDS=()
    say "daemons stopped"
}

stop_snakemake() { # a snakemake that lost track of its jobs ignores SIGTERM
    [ -n "${SMK_PID:-}" ] || return 0
    local child
    child=$(ps -o pid= --ppid "$SMK_PID" || true)
    kill "$SMK_PID" 2>/dev/null || true
    for _ in $(seq 1 20); do
        kill -0 "$SMK_PID" 2>/dev/null || break
        sleep 0.5
    done
    # shellcheck disable=SC2086 # $child: zero or one pid
    kill -9 "$SMK_PID" $child 2>/dev/null || true
    SMK_PID=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_snakemake
    stop_cluster
    unlink_system_conf
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "${N6QAT_SLURM_KEEP:-0}" = 1 ]; then
            say "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    if [ "$STATUS" = 0 ] && [ "$rc" = 0 ]; then
        echo "SLURM test passed; wall time $((SECONDS - START)) s"
    else
        echo "SLURM test FAILED (exit $rc); wall time $((SECONDS - START)) s" >&2
        [ "$rc" = 0 ] && rc=1
    fi
    exit "$rc"
}

# ---------------------------------------------------------------------------- runs

snakemake_cmd() { # snakemake_cmd WORKDIR ARGS...: SMK_CMD = the workflow on the tiny config
    local dir=$1
    shift
    SMK_CMD=(timeout --kill-after=30 "$RUN_TIMEOUT" "$VENV/bin/python" -m snakemake
        --snakefile "$ROOT/Snakefile" --directory "$dir" --configfile "${CONFIGS[@]}" "$@")
}

show_failure() { # show_failure LOG WHAT
    if grep -q "^Error in rule" "$1"; then # the failed jobs and their logs
        sed -n '/^Error in rule/,/^Shutting down/p' "$1" | head -n 150 >&2
    else
        tail -n 60 "$1" >&2
    fi
    fail "$2 (log above: $1)"
}

# Flags for this test cluster only: it has no accounting database (job states from
# squeue), jobs are short (first status check after 6 s, most are done by then) and the
# SLURM logs are kept as evidence.
SLURM_TEST_FLAGS=(--slurm-status-command squeue --slurm-init-seconds-before-status-checks 6
    --slurm-keep-successful-logs)

main() {
    cd "$ROOT"
    require_tools
    reap_stale_runs
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/n6qat-slurm.XXXXXX")
    echo $$ >"$WORK/owner.pid"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    write_config
    link_system_conf
    start_cluster
    export PATH="$VENV/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=2

    say "local reference run (--cores 2)"
    snakemake_cmd "$WORK/local" --cores 2
    "${SMK_CMD[@]}" >"$WORK/local.log" 2>&1 ||
        show_failure "$WORK/local.log" "the local reference run failed"

    say "SLURM run: --profile profiles/slurm"
    snakemake_cmd "$WORK/slurm" --profile profiles/slurm "${SLURM_TEST_FLAGS[@]}"
    "${SMK_CMD[@]}" >"$WORK/slurm.log" 2>&1 &
    SMK_PID=$!
    local preempt_rc=0
    "$VENV/bin/python" "$HERE/slurm_check.py" preempt-qat --workdir "$WORK/slurm" \
        --overlay "$HERE/preemptible.yaml" --cpus "$CPUS" --watch-pid "$SMK_PID" \
        --timeout "$RUN_TIMEOUT" || preempt_rc=$?
    local smk_rc=0
    wait "$SMK_PID" || smk_rc=$?
    SMK_PID=""
    [ "$smk_rc" = 0 ] || show_failure "$WORK/slurm.log" "the SLURM run failed (exit $smk_rc)"
    [ "$preempt_rc" = 0 ] || fail "could not preempt the QAT job (see above)"

    say "checking SLURM's records and logs, comparing with the local run"
    "$VENV/bin/python" "$HERE/slurm_check.py" verify --slurm-dir "$WORK/slurm" \
        --local-dir "$WORK/local" --log "$WORK/slurm.log" \
        --profile "$ROOT/profiles/slurm/config.yaml" --overlay "$HERE/preemptible.yaml"

    say "GPU switch: QAT again with gpu: 1 in a copy of the profile"
    "$VENV/bin/python" "$HERE/slurm_check.py" gpu-profile \
        --profile "$ROOT/profiles/slurm/config.yaml" --out "$WORK/profile-gpu"
    snakemake_cmd "$WORK/slurm" --profile "$WORK/profile-gpu" "${SLURM_TEST_FLAGS[@]}" \
        --forcerun qat --until qat
    "${SMK_CMD[@]}" >"$WORK/gpu.log" 2>&1 ||
        show_failure "$WORK/gpu.log" "the GPU run failed"
    "$VENV/bin/python" "$HERE/slurm_check.py" verify-gpu --log "$WORK/gpu.log"
    STATUS=0
}

main "$@"
