#!/bin/sh
# Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d), as the
# superuser: the two roles of ordo (docs/security.md). ordo_owner owns database ordo and runs
# `ordo migrate`; ordo_worker is what every other ordo process connects as, and may do nothing
# until `ordo migrate --grant-to ordo_worker` lets it read and write rows.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v owner_password="$ORDO_DB_OWNER_PASSWORD" -v worker_password="$ORDO_DB_WORKER_PASSWORD" <<'SQL'
CREATE ROLE ordo_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE ordo_worker LOGIN PASSWORD :'worker_password';
CREATE DATABASE ordo OWNER ordo_owner;
SQL
