// Runs drizzle-orm's own PostgreSQL migrator, so tests can prove that Baton and
// drizzle agree on `drizzle.__drizzle_migrations`.
//
// Usage: DATABASE_URL=postgres://... node migrate.mjs <migrationsFolder>
// Prints one JSON line: {"ok": true} or {"ok": false, "error": "..."}; exit 1 on failure.
import { drizzle } from "drizzle-orm/node-postgres";
import { migrate } from "drizzle-orm/node-postgres/migrator";
import pg from "pg";

const migrationsFolder = process.argv[2];
if (!migrationsFolder || !process.env.DATABASE_URL) {
  console.error("usage: DATABASE_URL=postgres://... node migrate.mjs <migrationsFolder>");
  process.exit(2);
}

const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
await client.connect();
try {
  await migrate(drizzle(client), { migrationsFolder });
  console.log(JSON.stringify({ ok: true }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: String(e?.cause?.message ?? e?.message ?? e) }));
  process.exitCode = 1;
} finally {
  await client.end();
}
