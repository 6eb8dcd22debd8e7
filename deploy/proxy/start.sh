#!/bin/sh
# Starts the UI proxy (Caddyfile beside this script): hashes the operator's and the viewer's passwords with bcrypt
# at start, so that no hash or password file is ever written, then runs Caddy in the foreground.
# Needs DAGSTER_UI_USER, DAGSTER_UI_PASSWORD, DAGSTER_VIEWER_USER, DAGSTER_VIEWER_PASSWORD and the UI_* addresses.
set -eu
: "${DAGSTER_UI_USER:?set DAGSTER_UI_USER}" "${DAGSTER_VIEWER_USER:?set DAGSTER_VIEWER_USER}"
: "${DAGSTER_UI_PASSWORD:?set DAGSTER_UI_PASSWORD}" "${DAGSTER_VIEWER_PASSWORD:?set DAGSTER_VIEWER_PASSWORD}"
export UI_OPERATOR_USER="$DAGSTER_UI_USER" UI_VIEWER_USER="$DAGSTER_VIEWER_USER"
UI_OPERATOR_HASH="$(printf '%s\n' "$DAGSTER_UI_PASSWORD" | caddy hash-password)"
UI_VIEWER_HASH="$(printf '%s\n' "$DAGSTER_VIEWER_PASSWORD" | caddy hash-password)"
export UI_OPERATOR_HASH UI_VIEWER_HASH
unset DAGSTER_UI_PASSWORD DAGSTER_VIEWER_PASSWORD
export UI_ALLOWED_HOSTS="${UI_ALLOWED_HOSTS:-localhost 127.0.0.1}" UI_BIND_ADDRESS="${UI_BIND_ADDRESS:-127.0.0.1}"
exec caddy run --config "$(dirname "$0")/Caddyfile" --adapter caddyfile
