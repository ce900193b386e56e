-- compose.yaml's PostgreSQL: the demo service's database in each zone
-- (`baton` itself comes from POSTGRES_DB). The daemons' configuration points at
-- them (ops/compose/init.sh).
CREATE DATABASE shop_staging;
CREATE DATABASE shop_production;
