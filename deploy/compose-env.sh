#!/usr/bin/env sh
# Write the compose demo's secrets into .env (next to docker-compose.yml), once: random
# PostgreSQL and MinIO passwords and fileflow's encryption key. An existing .env is kept
# (the encryption key must stay the same for the jobs already stored). Readable by you only.
set -eu
cd "$(dirname "$0")/.."
if [ -e .env ]; then
    echo ".env exists; keeping it" >&2
    exit 0
fi
random() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
{
    echo "POSTGRES_PASSWORD=$(random 24)"
    echo "MINIO_ROOT_USER=fileflow-$(random 4)"
    echo "MINIO_ROOT_PASSWORD=$(random 24)"
    echo "FILEFLOW_ENCRYPTION_KEY=$(head -c 32 /dev/urandom | base64 | tr -d '\n')"
} > .env
echo "wrote .env (mode 0600): POSTGRES_PASSWORD, MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, FILEFLOW_ENCRYPTION_KEY" >&2
