#!/usr/bin/env bash
# Back up production: both Postgres databases (Dagster instance, MLflow backend), the data volume (data
# root with the MLflow artifacts: the only copy of every registered model) and MLflow's accounts. `make deploy-backup` runs it.
#   deploy/backup.sh [target folder]        default deploy/backups/<UTC timestamp>/
# Consistent while running: pg_dump takes a snapshot; the data volume is copied after the dumps, so every
# model version the dumps know has its artifacts in the copy (later files are extra, never missing).
# Restore: docs/production.md.
set -euo pipefail
cd "$(dirname "$0")"
compose=(docker compose -f docker-compose.yaml)
target="${1:-backups/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$target"
user="$("${compose[@]}" exec -T postgres sh -c 'echo "$POSTGRES_USER"')"
for db in dagster mlflow; do
    "${compose[@]}" exec -T postgres pg_dump -U "$user" -d "$db" --format=custom > "$target/$db.dump"
done
"${compose[@]}" run --rm --no-deps -T --user "$(id -u):$(id -g)" --entrypoint tar -v "$(cd "$target" && pwd)":/backup retention \
    -czf /backup/data.tar.gz -C /opt/dagster data
# MLflow's accounts and grants (the basic-auth app's users store)
"${compose[@]}" run --rm --no-deps -T --user "$(id -u):$(id -g)" --entrypoint tar -v "$(cd "$target" && pwd)":/backup mlflow \
    -czf /backup/mlflow-auth.tar.gz -C /opt/dagster mlflow-auth
ls -l "$target"
