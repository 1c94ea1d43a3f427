#!/bin/sh
# Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d), as the
# superuser: the roles of ordo (docs/security.md), and ordo_monitor for the metrics exporter.
# ordo_owner owns database ordo and runs `ordo migrate`; ordo_worker is what the workers connect as, and ordo_reader what the read API
# connects as. Neither may do anything until `ordo migrate --grant-to ordo_worker
# --grant-read-to ordo_reader` lets the first read and write rows and the second read them.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v owner_password="$ORDO_DB_OWNER_PASSWORD" -v worker_password="$ORDO_DB_WORKER_PASSWORD" \
  -v reader_password="$ORDO_DB_READER_PASSWORD" -v monitor_password="$ORDO_DB_MONITOR_PASSWORD" <<'SQL'
CREATE ROLE ordo_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE ordo_worker LOGIN PASSWORD :'worker_password';
CREATE ROLE ordo_reader LOGIN PASSWORD :'reader_password';
-- The metrics exporter: the statistics views, no table.
CREATE ROLE ordo_monitor LOGIN PASSWORD :'monitor_password' IN ROLE pg_monitor;
CREATE DATABASE ordo OWNER ordo_owner;
SQL
