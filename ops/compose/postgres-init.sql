-- compose.yaml's PostgreSQL: the demo service's database in each zone and
-- Terraform's state database (the infrastructure daemons of profile `seed`);
-- `baton` itself comes from POSTGRES_DB. The daemons' configuration points at
-- them (ops/compose/init.sh).
CREATE DATABASE shop_staging;
CREATE DATABASE shop_production;
CREATE DATABASE terraform;
