#!/usr/bin/env bash
# Start the MLflow tracking server that the pipelines log to (MLFLOW_TRACKING_URI=http://HOST:PORT).
#
#   bash cluster/mlflow_server.sh                  # foreground (containers, systemd, a terminal)
#   bash cluster/mlflow_server.sh --background     # detach, wait until it answers, then return
#   bash cluster/mlflow_server.sh --print-command  # show the mlflow command line and exit
#
# Two modes, chosen by MLFLOW_DB_HOST:
#   unset (one machine): runs in sqlite:///$MLFLOW_STATE_DIR/mlflow.db, artifacts in
#       $MLFLOW_STATE_DIR/artifacts (or MLFLOW_ARTIFACTS_DESTINATION).
#   set (a cluster): runs in PostgreSQL at postgresql://$MLFLOW_DB_USER@$MLFLOW_DB_HOST:$MLFLOW_DB_PORT/$MLFLOW_DB_NAME,
#       artifacts in MLFLOW_ARTIFACTS_DESTINATION (required; an object-store URI such as
#       s3://bucket/handsonvlm/mlflow-artifacts, reached with the machine's own cloud identity).
#       The password is never part of the URI (it would show in `ps`): libpq reads it from
#       PGPASSWORD or from ~/.pgpass (PGPASSFILE), as psql does.
#
# Other settings (environment):
#   MLFLOW_HOST       address to bind; default 127.0.0.1 (this machine only). A cluster head binds
#                     its private address so that workers can log; see docs/CLUSTER.md for putting
#                     the UI behind authentication.
#   MLFLOW_PORT       default 5000
#   MLFLOW_WORKERS    server processes, default 2
#   MLFLOW_STATE_DIR  sqlite database, local artifacts, and with --background its log, pid file and
#                     tracking_uri (the URI to give clients); default runs/mlflow_server
#   MLFLOW_DB_PORT (5432), MLFLOW_DB_NAME (mlflow), MLFLOW_DB_USER (mlflow),
#   MLFLOW_DB_SSLMODE (prefer; "require"/"verify-full" for a managed database)
#   MLFLOW_ALLOWED_HOSTS  Host headers to accept (MLflow's default: localhost and private addresses)
#   MLFLOW_BIN        the mlflow executable; default: mlflow on PATH
set -euo pipefail

mode=foreground
case "${1:-}" in
  "") ;;
  --background) mode=background ;;
  --print-command) mode=print ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "mlflow_server.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac

host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
workers=${MLFLOW_WORKERS:-2}
state_dir=${MLFLOW_STATE_DIR:-runs/mlflow_server}
mlflow_bin=${MLFLOW_BIN:-mlflow}
state_dir=$(realpath -m "$state_dir")
[[ "$mode" == print ]] || mkdir -p "$state_dir"

if [[ -n "${MLFLOW_DB_HOST:-}" ]]; then
  backend="postgresql://${MLFLOW_DB_USER:-mlflow}@${MLFLOW_DB_HOST}:${MLFLOW_DB_PORT:-5432}/${MLFLOW_DB_NAME:-mlflow}?sslmode=${MLFLOW_DB_SSLMODE:-prefer}"
  if [[ -z "${MLFLOW_ARTIFACTS_DESTINATION:-}" ]]; then
    echo "mlflow_server.sh: with a PostgreSQL backend set MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/handsonvlm/mlflow-artifacts)" >&2
    exit 2
  fi
  artifacts=$MLFLOW_ARTIFACTS_DESTINATION
else
  backend="sqlite:///$state_dir/mlflow.db"
  artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$state_dir/artifacts}
fi

command=("$mlflow_bin" server
  --backend-store-uri "$backend"
  --artifacts-destination "$artifacts"
  --serve-artifacts
  --host "$host" --port "$port" --workers "$workers")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  command+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
# Without this MLflow 3.x also starts a pool of job-runner processes (~2 GB) that nothing here uses.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

case "$mode" in
  print)
    printf '%q ' "${command[@]}"; echo
    ;;
  foreground)
    echo "mlflow_server.sh: tracking URI http://$host:$port (backend ${backend%%://*}, artifacts $artifacts)"
    exec "${command[@]}"
    ;;
  background)
    pid_file=$state_dir/mlflow_server.pid
    log_file=$state_dir/mlflow_server.log
    # A re-run (e.g. `ray up` again) replaces the server this script started before.
    if [[ -s "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
      kill "$(cat "$pid_file")"
      for _ in $(seq 30); do kill -0 "$(cat "$pid_file")" 2>/dev/null || break; sleep 1; done
    fi
    nohup "${command[@]}" >"$log_file" 2>&1 </dev/null &
    echo $! >"$pid_file"
    disown 2>/dev/null || true  # outlive the SSH/exec session that started it
    # Health check with Python: curl is not in every image.
    if python3 - "$host" "$port" <<'EOF'
import sys, time, urllib.request
host, port = sys.argv[1], sys.argv[2]
host = "127.0.0.1" if host == "0.0.0.0" else host
for _ in range(120):
    try:
        urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(1)
EOF
    then
      # Where clients find it (docs/CLUSTER.md reads this file with `ray exec`).
      echo "http://$host:$port" >"$state_dir/tracking_uri"
      echo "mlflow_server.sh: tracking URI http://$host:$port (pid $(cat "$pid_file"), log $log_file)"
    else
      echo "mlflow_server.sh: the server did not answer on $host:$port within 120 s; last log lines:" >&2
      tail -n 30 "$log_file" >&2
      exit 1
    fi
    ;;
esac
