//! Integrity checks after a migration: constraints, foreign keys, and the schema
//! against what the migrations produce on an empty scratch database.
//!
//! - Every `NOT VALID` constraint (tables and domains) is validated with
//!   `ALTER TABLE … VALIDATE CONSTRAINT`; each attempt runs in a savepoint, so all
//!   failures are reported, each naming its constraint.
//! - Every validated foreign key is checked with an anti-join, which also catches
//!   rows that slipped in while triggers were disabled.
//! - A scratch database is created through `migration.admin_url` from `template0`,
//!   the folder's migrations are applied there (as drizzle would, in one
//!   transaction), and a snapshot of both schemas is compared: relations, columns
//!   (type, nullability, default, identity, generated), constraints, indexes and
//!   enums, outside `pg_catalog`, `information_schema`, `drizzle` and
//!   `baton_migrations`. `NOT VALID` is ignored in the comparison. The scratch
//!   database is dropped afterwards, also when the job is cancelled.
//! - The expected schema depends only on the migrations' texts (and the scratch
//!   server's version), so it is cached by their hash in the admin database
//!   (`baton_migration_cache.expected`, entries unused for 90 days deleted): a
//!   folder is replayed once, on its first deploy, and every later zone, replica
//!   or redeploy of the same folder compares against that result.
//! - A folder's first deploy need not replay it either when the expected schema
//!   of the migrations the target already has is known: none (an empty
//!   database) or cached (the previous folder). The target is compared with it
//!   inside the migration's transaction *before* anything is applied, and the
//!   new migrations then run on exactly that schema, so what they produce is
//!   the new folder's expected schema: it is read from the target and cached
//!   (see [`Expected::derived`]). A target that differs from its applied
//!   migrations falls back to the scratch replay, which names the differences.
//!
//! The foreign key check reads whole child tables; on very large tables it takes as
//! long as a sequential scan of each.

use std::collections::BTreeMap;
use std::fmt;

use baton_shared::secret::Secret;
use sha2::Digest;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::db;
use crate::drizzle::MigrationSet;
use crate::error::{Error, Problem};

/// SQL condition on `n.nspname` leaving out schemas that are not the application's;
/// a macro so the queries stay `&'static str` literals.
macro_rules! app_schemas {
    () => {
        " n.nspname NOT IN ('pg_catalog', 'information_schema', 'drizzle', 'baton_migrations') \
         AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' "
    };
}

/// What `verify` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Constraints that were `NOT VALID` and now are valid, as `table.constraint`.
    pub validated: Vec<String>,
    pub foreign_keys_checked: usize,
    pub problems: Vec<Problem>,
    /// Whether the expected schema came from the cache (see [`expected_snapshot`]).
    pub expected_cached: bool,
    /// Whether it was derived from the target (see [`Expected::derived`]).
    pub expected_derived: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "validated_constraints": self.validated,
            "foreign_keys_checked": self.foreign_keys_checked,
            "schema_matches": !self.problems.iter().any(|p| matches!(p, Problem::SchemaDifference(_))),
            "expected_schema": if self.expected_derived {
                "derived: before applying, the database matched the schema of the migrations it had; the new ones ran on it"
            } else if self.expected_cached {
                "cached"
            } else {
                "replayed on a scratch database"
            },
        })
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Runs every check on `conn`, which must be inside a transaction (checks use savepoints).
pub async fn check(conn: &mut PgConnection, service: &str, expected: &Expected) -> Result<Report, Error> {
    let mut report = Report {
        expected_cached: expected.cached,
        expected_derived: expected.derived,
        ..Report::default()
    };
    validate_constraints(conn, service, &mut report).await?;
    check_foreign_keys(conn, service, &mut report).await?;
    let actual = snapshot(conn).await.map_err(|source| Error::Database {
        service: service.to_owned(),
        doing: "reading the schema",
        source,
    })?;
    report
        .problems
        .extend(actual.diff(&expected.schema).into_iter().map(Problem::SchemaDifference));
    Ok(report)
}

async fn validate_constraints(conn: &mut PgConnection, service: &str, report: &mut Report) -> Result<(), Error> {
    let err = |doing| {
        let service = service.to_owned();
        move |source| Error::Database { service, doing, source }
    };
    let rows = sqlx::query(concat!(
        "SELECT CASE WHEN c.conrelid <> 0 THEN 'TABLE' ELSE 'DOMAIN' END AS kind, \
                CASE WHEN c.conrelid <> 0 THEN c.conrelid::regclass::text ELSE c.contypid::regtype::text END AS owner, \
                c.conname \
         FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace \
         WHERE NOT c.convalidated AND",
        app_schemas!(),
        "ORDER BY 2, 3"
    ))
    .fetch_all(&mut *conn)
    .await
    .map_err(err("listing NOT VALID constraints"))?;
    for row in rows {
        let kind: String = row.try_get("kind").map_err(err("listing NOT VALID constraints"))?;
        let owner: String = row.try_get("owner").map_err(err("listing NOT VALID constraints"))?;
        let name: String = row.try_get("conname").map_err(err("listing NOT VALID constraints"))?;
        sqlx::raw_sql("SAVEPOINT baton_validate")
            .execute(&mut *conn)
            .await
            .map_err(err("validating constraints"))?;
        // `owner` is regclass/regtype text: already quoted and qualified as needed.
        let sql = format!("ALTER {kind} {owner} VALIDATE CONSTRAINT {}", quote_ident(&name));
        match sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await {
            Ok(_) => {
                sqlx::raw_sql("RELEASE SAVEPOINT baton_validate")
                    .execute(&mut *conn)
                    .await
                    .map_err(err("validating constraints"))?;
                tracing::info!(service, constraint = %name, owner = %owner, "constraint validated");
                report.validated.push(format!("{owner}.{name}"));
            }
            Err(e) => {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT baton_validate")
                    .execute(&mut *conn)
                    .await
                    .map_err(err("validating constraints"))?;
                let message = match &e {
                    sqlx::Error::Database(db) => db.message().to_owned(),
                    other => other.to_string(),
                };
                tracing::warn!(service, constraint = %name, owner = %owner, error = %message, "constraint does not hold");
                report.problems.push(Problem::ConstraintInvalid {
                    table: owner,
                    constraint: name,
                    message,
                });
            }
        }
    }
    Ok(())
}

async fn check_foreign_keys(conn: &mut PgConnection, service: &str, report: &mut Report) -> Result<(), Error> {
    let err = |doing| {
        let service = service.to_owned();
        move |source| Error::Database { service, doing, source }
    };
    let rows = sqlx::query(concat!(
        "SELECT c.conname, c.conrelid::regclass::text AS child, c.confrelid::regclass::text AS parent, \
                c.confmatchtype::text AS matchtype, \
                ARRAY(SELECT quote_ident(a.attname) FROM unnest(c.conkey) WITH ORDINALITY k(num, ord) \
                      JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num ORDER BY k.ord) AS child_cols, \
                ARRAY(SELECT quote_ident(a.attname) FROM unnest(c.confkey) WITH ORDINALITY k(num, ord) \
                      JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.num ORDER BY k.ord) AS parent_cols \
         FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace \
         WHERE c.contype = 'f' AND c.convalidated AND",
        app_schemas!(),
        "ORDER BY 2, 1"
    ))
    .fetch_all(&mut *conn)
    .await
    .map_err(err("listing foreign keys"))?;
    for row in rows {
        let get = |col: &str| row.try_get::<String, _>(col);
        let (name, child, parent, matchtype) = (
            get("conname").map_err(err("listing foreign keys"))?,
            get("child").map_err(err("listing foreign keys"))?,
            get("parent").map_err(err("listing foreign keys"))?,
            get("matchtype").map_err(err("listing foreign keys"))?,
        );
        let child_cols: Vec<String> = row.try_get("child_cols").map_err(err("listing foreign keys"))?;
        let parent_cols: Vec<String> = row.try_get("parent_cols").map_err(err("listing foreign keys"))?;
        let sql = fk_violations_sql(&child, &parent, &child_cols, &parent_cols, matchtype == "f");
        let rows: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_one(&mut *conn)
            .await
            .map_err(err("checking foreign keys"))?;
        report.foreign_keys_checked += 1;
        if rows > 0 {
            tracing::warn!(service, constraint = %name, table = %child, rows, "foreign key does not hold");
            report.problems.push(Problem::ForeignKeyViolation {
                table: child,
                constraint: name,
                rows,
            });
        }
    }
    Ok(())
}

/// Counts child rows (up to 1000) whose key has no parent row. With MATCH SIMPLE a
/// key with any NULL is exempt; with MATCH FULL only an all-NULL key is.
fn fk_violations_sql(child: &str, parent: &str, child_cols: &[String], parent_cols: &[String], full: bool) -> String {
    let all_set = child_cols
        .iter()
        .map(|c| format!("c.{c} IS NOT NULL"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let any_set = child_cols
        .iter()
        .map(|c| format!("c.{c} IS NOT NULL"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let joined = child_cols
        .iter()
        .zip(parent_cols)
        .map(|(c, p)| format!("p.{p} = c.{c}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let missing = format!("NOT EXISTS (SELECT 1 FROM {parent} p WHERE {joined})");
    let condition = if full {
        format!("({any_set}) AND (NOT ({all_set}) OR {missing})")
    } else {
        format!("{all_set} AND {missing}")
    };
    format!("SELECT count(*) FROM (SELECT 1 FROM {child} c WHERE {condition} LIMIT 1000) v")
}

/// A schema as comparable descriptions: key (`column public.users.email`) -> details.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(pub BTreeMap<String, String>);

impl Snapshot {
    /// Differences of `self` (the database) from `expected` (the migrations), readable.
    pub fn diff(&self, expected: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (k, want) in &expected.0 {
            match self.0.get(k) {
                None => out.push(format!("{k} is missing (expected {want})")),
                Some(have) if have != want => out.push(format!("{k} is {have}, expected {want}")),
                Some(_) => {}
            }
        }
        for (k, have) in &self.0 {
            if !expected.0.contains_key(k) {
                out.push(format!("{k} ({have}) is not produced by the migrations"));
            }
        }
        out
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.0 {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

/// Reads the application's schema.
pub async fn snapshot(conn: &mut PgConnection) -> Result<Snapshot, sqlx::Error> {
    let mut map = BTreeMap::new();
    let relations = sqlx::query(concat!(
        "SELECT n.nspname, c.relname, CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'partitioned table' \
                WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table' \
                WHEN 'S' THEN 'sequence' END AS kind \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND",
        app_schemas!(),
        ""
    ))
    .fetch_all(&mut *conn)
    .await?;
    for r in relations {
        let (s, t, kind): (String, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        map.insert(format!("relation {s}.{t}"), kind);
    }
    let columns = sqlx::query(concat!(
        "SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull, \
                pg_get_expr(d.adbin, d.adrelid) AS default, a.attidentity::text AS identity, \
                a.attgenerated::text AS generated \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND",
        app_schemas!(),
        ""
    ))
    .fetch_all(&mut *conn)
    .await?;
    for r in columns {
        let (s, t, col, ty): (String, String, String, String) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
        let not_null: bool = r.try_get(4)?;
        let default: Option<String> = r.try_get(5)?;
        let identity: String = r.try_get(6)?;
        let generated: String = r.try_get(7)?;
        let mut desc = ty;
        desc.push_str(if not_null { " not null" } else { " null" });
        if let Some(d) = default {
            let what = if generated == "s" {
                "generated always as"
            } else {
                "default"
            };
            desc.push_str(&format!(" {what} {d}"));
        }
        match identity.as_str() {
            "a" => desc.push_str(" generated always as identity"),
            "d" => desc.push_str(" generated by default as identity"),
            _ => {}
        }
        map.insert(format!("column {s}.{t}.{col}"), desc);
    }
    let constraints = sqlx::query(concat!(
        "SELECT n.nspname, c.relname, con.conname, pg_get_constraintdef(con.oid) \
         FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE",
        app_schemas!(),
        ""
    ))
    .fetch_all(&mut *conn)
    .await?;
    for r in constraints {
        let (s, t, name, def): (String, String, String, String) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
        // Validation state is not schema: the scratch database validates nothing.
        let def = def.strip_suffix(" NOT VALID").map(str::to_owned).unwrap_or(def);
        map.insert(format!("constraint {name} on {s}.{t}"), def);
    }
    let indexes = sqlx::query(concat!(
        "SELECT n.nspname, i.relname, pg_get_indexdef(x.indexrelid) \
         FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_namespace n ON n.oid = i.relnamespace \
         WHERE",
        app_schemas!(),
        ""
    ))
    .fetch_all(&mut *conn)
    .await?;
    for r in indexes {
        let (s, name, def): (String, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        map.insert(format!("index {s}.{name}"), def);
    }
    let enums = sqlx::query(concat!(
        "SELECT n.nspname, t.typname, string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) \
         FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid JOIN pg_namespace n ON n.oid = t.typnamespace \
         WHERE",
        app_schemas!(),
        "GROUP BY 1, 2"
    ))
    .fetch_all(&mut *conn)
    .await?;
    for r in enums {
        let (s, name, labels): (String, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        map.insert(format!("enum {s}.{name}"), format!("({labels})"));
    }
    Ok(Snapshot(map))
}

/// Prefix of the scratch databases verification creates.
pub const SCRATCH_PREFIX: &str = "baton_scratch_";

/// A scratch database that is dropped when this value goes away, even if the job
/// is cancelled mid-way; a daemon killed meanwhile leaves it to the next sweep
/// (`baton_shared::scratch`).
struct Scratch {
    admin: PgConnectOptions,
    name: String,
    held: Option<baton_shared::scratch::Held>,
    dropped: bool,
}

impl Scratch {
    async fn create(admin: PgConnectOptions) -> Result<Self, Error> {
        let name = baton_shared::scratch::name(SCRATCH_PREFIX);
        let scratch_err = |doing: String| move |source| Error::Scratch { doing, source };
        let lock = db::connect_with(&admin)
            .await
            .map_err(scratch_err("connecting with migration.admin_url".into()))?;
        let held = baton_shared::scratch::hold(lock, &name)
            .await
            .map_err(scratch_err(format!("locking {name}")))?;
        let mut conn = db::connect_with(&admin).await.map_err(|source| Error::Scratch {
            doing: "connecting with migration.admin_url".into(),
            source,
        })?;
        // template0: nothing from template1 leaks into the expected schema.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE {} TEMPLATE template0",
            quote_ident(&name)
        )))
        .execute(&mut conn)
        .await
        .map_err(|source| Error::Scratch {
            doing: format!("creating {name}"),
            source,
        })?;
        let _ = conn.close().await;
        baton_shared::failpoint::pause("db-migration-scratch-created").await;
        Ok(Self {
            admin,
            name,
            held: Some(held),
            dropped: false,
        })
    }

    async fn drop_now(mut self) -> Result<(), Error> {
        self.dropped = true;
        let result = drop_database(&self.admin, &self.name).await;
        if let Some(held) = self.held.take() {
            held.release().await;
        }
        result
    }
}

/// Drops scratch databases that daemons killed mid-verification left behind
/// (none a live daemon uses).
pub async fn sweep_scratch(admin_url: &Secret<String>) -> Result<Vec<String>, Error> {
    let admin = db::options(admin_url).map_err(|source| Error::Scratch {
        doing: "reading migration.admin_url".into(),
        source,
    })?;
    let mut conn = db::connect_with(&admin).await.map_err(|source| Error::Scratch {
        doing: "connecting with migration.admin_url".into(),
        source,
    })?;
    let dropped = baton_shared::scratch::sweep(&mut conn, SCRATCH_PREFIX)
        .await
        .map_err(|source| Error::Scratch {
            doing: "sweeping leftover scratch databases".into(),
            source,
        });
    let _ = conn.close().await;
    dropped
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin, name, held) = (self.admin.clone(), self.name.clone(), self.held.take());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = drop_database(&admin, &name).await {
                    tracing::warn!(database = %name, error = %e, "scratch database left behind");
                }
                if let Some(held) = held {
                    held.release().await;
                }
            });
        } else {
            tracing::warn!(database = %name, "scratch database left behind: no runtime to drop it");
        }
    }
}

async fn drop_database(admin: &PgConnectOptions, name: &str) -> Result<(), Error> {
    let mut conn = db::connect_with(admin).await.map_err(|source| Error::Scratch {
        doing: "connecting with migration.admin_url".into(),
        source,
    })?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(name)
    )))
    .execute(&mut conn)
    .await
    .map_err(|source| Error::Scratch {
        doing: format!("dropping {name}"),
        source,
    })?;
    let _ = conn.close().await;
    Ok(())
}

/// The schema a folder's migrations produce on an empty database, and where
/// it came from.
#[derive(Debug, Clone)]
pub struct Expected {
    pub schema: Snapshot,
    /// From the cache rather than replayed now.
    pub cached: bool,
    /// Read from the target after its new migrations ran on a schema that
    /// matched its applied ones: what the migrations produce, without a replay.
    pub derived: bool,
}

/// Expected schemas by what determines them (the scratch server's version and
/// every migration's tag and text, in order), in the admin database: every
/// daemon using that server shares them, so a folder is replayed once — on its
/// first deploy, usually to staging — and later zones and replicas compare
/// against the same result.
const CACHE: &str = "
CREATE SCHEMA IF NOT EXISTS baton_migration_cache;
CREATE TABLE IF NOT EXISTS baton_migration_cache.expected (
    key text PRIMARY KEY,
    migrations integer NOT NULL,
    snapshot jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    used_at timestamptz NOT NULL DEFAULT now()
);
";

/// Entries unused this long are deleted.
const CACHE_KEEP_DAYS: i32 = 90;

async fn server_version(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT current_setting('server_version_num')")
        .fetch_one(&mut *conn)
        .await
}

async fn cache_key(conn: &mut PgConnection, set: &MigrationSet) -> Result<String, sqlx::Error> {
    cache_key_of(conn, &set.migrations).await
}

async fn cache_key_of(
    conn: &mut PgConnection,
    migrations: &[crate::drizzle::Migration],
) -> Result<String, sqlx::Error> {
    let version = server_version(conn).await?;
    let mut h = sha2::Sha256::new();
    h.update(version.as_bytes());
    for m in migrations {
        h.update([0]);
        h.update(m.tag.as_bytes());
        h.update([0]);
        h.update(m.sql.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

async fn cached(conn: &mut PgConnection, key: &str) -> Result<Option<Snapshot>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('baton_migration_cache'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(CACHE).execute(&mut *tx).await?;
    tx.commit().await?;
    let found: Option<serde_json::Value> = sqlx::query_scalar(
        "UPDATE baton_migration_cache.expected SET used_at = now() WHERE key = $1 RETURNING snapshot",
    )
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.and_then(|v| serde_json::from_value(v).ok()).map(Snapshot))
}

async fn remember(conn: &mut PgConnection, key: &str, set: &MigrationSet, snap: &Snapshot) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO baton_migration_cache.expected (key, migrations, snapshot) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(i32::try_from(set.migrations.len()).unwrap_or(i32::MAX))
    .bind(serde_json::to_value(&snap.0).unwrap_or_default())
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM baton_migration_cache.expected WHERE used_at < now() - make_interval(days => $1)")
        .bind(CACHE_KEEP_DAYS)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What is known of a folder's expected schema without a replay.
pub enum Known {
    /// The whole folder's, from the cache.
    Cached(Expected),
    /// That of the migrations the target already has: empty for none, else
    /// from the cache (see [`Expected::derived`]).
    Prefix(Snapshot),
    Neither,
}

/// `Error::Scratch` for a failure while `doing`.
fn scratch_err(doing: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |source| Error::Scratch {
        doing: doing.into(),
        source,
    }
}

/// `migration.admin_url`'s options and a connection to its database, which
/// holds the cache.
async fn admin(admin_url: &Secret<String>) -> Result<(PgConnectOptions, PgConnection), Error> {
    let opts = db::options(admin_url).map_err(scratch_err("reading migration.admin_url"))?;
    let conn = db::connect_with(&opts)
        .await
        .map_err(scratch_err("connecting with migration.admin_url"))?;
    Ok((opts, conn))
}

/// Looks the folder up in the cache (one connection to the admin database);
/// failing that, and with `prefix` (the number of the folder's first
/// migrations the target has, when the pending ones are exactly the rest, and
/// the target), the schema of those. No prefix when the target's server is not
/// the admin server's version: schemas read on two versions may print differently.
pub async fn known(
    admin_url: &Secret<String>,
    set: &MigrationSet,
    prefix: Option<(usize, &mut PgConnection)>,
) -> Result<Known, Error> {
    let err = scratch_err("reading the expected-schema cache");
    let (_, mut conn) = admin(admin_url).await?;
    let key = cache_key(&mut conn, set).await.map_err(&err)?;
    let known = if let Some(schema) = cached(&mut conn, &key).await.map_err(&err)? {
        Known::Cached(Expected {
            schema,
            cached: true,
            derived: false,
        })
    } else if let Some((applied, target)) = prefix {
        if server_version(&mut conn).await.map_err(&err)? != server_version(target).await.map_err(&err)? {
            Known::Neither
        } else if applied == 0 {
            Known::Prefix(Snapshot::default())
        } else {
            let key = cache_key_of(&mut conn, &set.migrations[..applied.min(set.migrations.len())])
                .await
                .map_err(&err)?;
            cached(&mut conn, &key)
                .await
                .map_err(&err)?
                .map_or(Known::Neither, Known::Prefix)
        }
    } else {
        Known::Neither
    };
    let _ = conn.close().await;
    Ok(known)
}

/// Caches `schema` as what the whole folder produces (see [`Expected::derived`]).
pub async fn remember_derived(admin_url: &Secret<String>, set: &MigrationSet, schema: &Snapshot) -> Result<(), Error> {
    let err = scratch_err("writing the expected-schema cache");
    let (_, mut conn) = admin(admin_url).await?;
    let key = cache_key(&mut conn, set).await.map_err(&err)?;
    // `cached` creates the cache table (under its lock) and says whether
    // another deploy of the same folder got there first.
    if cached(&mut conn, &key).await.map_err(&err)?.is_none() {
        remember(&mut conn, &key, set, schema).await.map_err(&err)?;
    }
    let _ = conn.close().await;
    Ok(())
}

/// The schema the folder's migrations produce on an empty database: from the
/// cache, or replayed on a scratch database (and then cached).
pub async fn expected_snapshot(admin_url: &Secret<String>, set: &MigrationSet) -> Result<Expected, Error> {
    match known(admin_url, set, None).await? {
        Known::Cached(e) => Ok(e),
        _ => replayed(admin_url, set).await,
    }
}

/// The folder replayed on a scratch database, and cached; for a folder the
/// cache was just found not to hold.
pub async fn replayed(admin_url: &Secret<String>, set: &MigrationSet) -> Result<Expected, Error> {
    let (admin, mut conn) = admin(admin_url).await?;
    let err = scratch_err("writing the expected-schema cache");
    let key = cache_key(&mut conn, set).await.map_err(&err)?;
    let scratch = Scratch::create(admin.clone()).await?;
    let result = replay(&admin.clone().database(&scratch.name), set).await;
    let dropped = scratch.drop_now().await;
    let schema = result?;
    dropped?;
    // The table exists: `known` created it looking for this folder.
    remember(&mut conn, &key, set, &schema).await.map_err(&err)?;
    let _ = conn.close().await;
    Ok(Expected {
        schema,
        cached: false,
        derived: false,
    })
}

async fn replay(opts: &PgConnectOptions, set: &MigrationSet) -> Result<Snapshot, Error> {
    let mut conn = db::connect_with(opts).await.map_err(|source| Error::Scratch {
        doing: "connecting to the scratch database".into(),
        source,
    })?;
    let mut tx = conn.begin().await.map_err(|source| Error::Scratch {
        doing: "starting a transaction".into(),
        source,
    })?;
    for m in &set.migrations {
        for (i, stmt) in m.statements().into_iter().enumerate() {
            sqlx::raw_sql(AssertSqlSafe(stmt.to_owned()))
                .execute(&mut *tx)
                .await
                .map_err(|source| Error::ScratchMigration {
                    tag: m.tag.clone(),
                    statement: i + 1,
                    source,
                })?;
        }
    }
    let snap = snapshot(&mut tx).await.map_err(|source| Error::Scratch {
        doing: "reading the expected schema".into(),
        source,
    })?;
    // Nothing to keep: the database is dropped next.
    let _ = tx.rollback().await;
    let _ = conn.close().await;
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_missing_extra_and_changed_objects() {
        let expected = Snapshot(BTreeMap::from([
            ("column public.users.email".to_owned(), "text not null".to_owned()),
            ("column public.users.nickname".to_owned(), "text null".to_owned()),
        ]));
        let actual = Snapshot(BTreeMap::from([
            ("column public.users.email".to_owned(), "text null".to_owned()),
            ("index public.extra".to_owned(), "CREATE INDEX extra".to_owned()),
        ]));
        let d = actual.diff(&expected);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("users.email is text null, expected text not null"));
        assert!(d[1].contains("nickname is missing"));
        assert!(d[2].contains("index public.extra"));
    }

    #[test]
    fn fk_check_respects_match_semantics() {
        let cols = vec!["\"a\"".to_owned()];
        let simple = fk_violations_sql("t", "p", &cols, &cols, false);
        assert!(simple.contains("c.\"a\" IS NOT NULL AND NOT EXISTS"), "{simple}");
        let full = fk_violations_sql("t", "p", &cols, &cols, true);
        assert!(full.contains("OR NOT EXISTS"), "{full}");
    }
}
