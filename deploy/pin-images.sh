#!/usr/bin/env bash
# Pins the base images by digest, or bumps the pins: pulls each tag below and writes NAME=tag@sha256:<digest> into
# deploy/.env (compose reads the pins from there and refuses to start without them; the Dockerfiles take them as
# build arguments). To bump: edit a tag here if the release line changes, run this, review `docker compose config`,
# rebuild (`make deploy`) and rerun the production tests. The worker image: CUDA_IMAGE, passed to
# `docker build -f deploy/k8s/Dockerfile.worker --build-arg CUDA_IMAGE=...`.
set -euo pipefail
cd "$(dirname "$0")"
[ -f .env ] || { echo "deploy/.env is missing: cp deploy/.env.example deploy/.env first" >&2; exit 1; }
pins=(
    "PYTHON_IMAGE=python:3.11-slim-bookworm"
    "POSTGRES_IMAGE=postgres:15-bookworm"
    "CADDY_IMAGE=caddy:2.6.4-alpine"          # the Caddyfile's syntax: 2.6 (Debian bookworm's caddy in the tests)
    "CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04"
)
for pin in "${pins[@]}"; do
    name="${pin%%=*}" tag="${pin#*=}"
    docker pull --quiet "$tag" >/dev/null
    digest="$(docker image inspect --format '{{index .RepoDigests 0}}' "$tag")"   # repo@sha256:...
    value="$tag@${digest#*@}"
    if grep -q "^$name=" .env; then
        sed -i "s|^$name=.*|$name=$value|" .env
    else
        echo "$name=$value" >> .env
    fi
    echo "$name=$value"
done
