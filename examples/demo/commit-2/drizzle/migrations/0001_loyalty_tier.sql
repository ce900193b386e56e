ALTER TABLE "customers" ADD COLUMN "loyalty_tier" text NOT NULL;
