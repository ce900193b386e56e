DROP TABLE "orders";
--> statement-breakpoint
DROP TABLE "customers";
