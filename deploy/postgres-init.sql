-- Runs once, when the Postgres volume is first initialised (docker-entrypoint-initdb.d):
-- the `dagster` database is POSTGRES_DB; MLflow's backend store gets its own database.
CREATE DATABASE mlflow;
