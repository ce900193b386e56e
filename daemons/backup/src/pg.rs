//! PostgreSQL: connections, the exported snapshot, per-table statistics, and
//! running `pg_dump`, `pg_restore` and `psql` without exposing passwords.
//!
//! Row counts and checksums are computed with the same session settings on the
//! source (inside the snapshot `pg_dump` reads) and on the restored copy, so a
//! verification compares like with like.

use std::path::Path;
use std::process::Stdio;
use std::str::FromStr;

use baton_shared::secret::Secret;
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::error::Error;

/// How much of a tool's stderr is kept for an error message.
const STDERR_LIMIT: usize = 4000;

/// A database to connect to, split so the password never lands on a command line.
#[derive(Clone)]
pub struct PgTarget {
    /// The URL without password: safe for `--dbname`, still not logged.
    url: url::Url,
    password: Option<Secret<String>>,
    database: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget").field("database", &self.database).finish()
    }
}

impl PgTarget {
    /// Parses a `postgres://` URL. The error describes the problem without echoing the URL.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut url = url::Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!(
                "must be a postgres:// or postgresql:// URL, not {}://",
                url.scheme()
            ));
        }
        let database = percent_decode_str(url.path().trim_start_matches('/'))
            .decode_utf8()
            .map_err(|_| "has a database name that is not UTF-8".to_owned())?
            .into_owned();
        if database.is_empty() || database.contains('/') {
            return Err("must name one database in its path (postgres://host/DATABASE)".to_owned());
        }
        let mut password = url
            .password()
            .map(|p| percent_decode_str(p).decode_utf8_lossy().into_owned());
        let _ = url.set_password(None);
        // libpq also takes `?password=`; move it out of the URL as well.
        let mut pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        if let Some(pos) = pairs.iter().position(|(k, _)| k == "password") {
            password = Some(pairs.remove(pos).1);
            if pairs.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
        }
        Ok(Self {
            url,
            password: password.map(Secret::new),
            database,
        })
    }

    /// The database name (not secret; used in logs and manifests).
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The same server and credentials, another database.
    pub fn with_database(&self, database: &str) -> Self {
        let mut other = self.clone();
        let encoded: String = url::form_urlencoded::byte_serialize(database.as_bytes()).collect();
        other.url.set_path(&format!("/{encoded}"));
        other.database = database.to_owned();
        other
    }

    fn connect_options(&self) -> Result<PgConnectOptions, Error> {
        let mut opts = PgConnectOptions::from_str(self.url.as_str())
            .map_err(Error::db(format!("database {}: bad connection URL", self.database)))?
            .database(&self.database)
            .application_name("baton-backup");
        if let Some(p) = &self.password {
            opts = opts.password(p.expose());
        }
        Ok(opts)
    }

    /// Connects with the session settings every statistic is computed under.
    pub async fn connect(&self) -> Result<PgConnection, Error> {
        let opts = self.connect_options()?;
        let mut conn = PgConnection::connect_with(&opts)
            .await
            .map_err(Error::db(format!("cannot connect to database {}", self.database)))?;
        baton_shared::nodelay::on_every_tcp_socket();
        // Row text depends on these; fixing them makes checksums comparable
        // between the source and a restored copy on another server.
        sqlx::raw_sql(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
             SET extra_float_digits = 1; SET bytea_output = 'hex'; SET search_path = pg_catalog",
        )
        .execute(&mut conn)
        .await
        .map_err(Error::db(format!("database {}: session setup", self.database)))?;
        Ok(conn)
    }

    /// A command for a libpq tool aimed at this database: password in the
    /// environment, never prompting, killed if the job is dropped.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("--no-password")
            .arg(format!("--dbname={}", self.url))
            .env_remove("PGPASSWORD")
            .env("PGAPPNAME", "baton-backup")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", p.expose());
        }
        cmd
    }
}

/// Row count and checksum of one table, as recorded in a backup's table list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableStats {
    pub schema: String,
    pub table: String,
    pub rows: i64,
    /// SHA-256 (hex) over the sums of the two 64-bit halves of `md5(row::text)`
    /// across all rows: independent of row order, constant memory on the server.
    pub checksum: String,
}

impl TableStats {
    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// User tables whose data `pg_dump` writes: ordinary tables outside the system
/// schemas, not temporary, not members of an extension.
pub async fn list_tables(conn: &mut PgConnection) -> Result<Vec<(String, String)>, Error> {
    let rows = sqlx::query(
        "SELECT n.nspname::text, c.relname::text
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind = 'r' AND c.relpersistence <> 't'
            AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
            AND NOT EXISTS (SELECT 1 FROM pg_depend d
                             WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
          ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(Error::db("listing tables"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Row count and checksum of each table, read through `conn`'s current snapshot.
pub async fn table_stats(conn: &mut PgConnection, tables: &[(String, String)]) -> Result<Vec<TableStats>, Error> {
    let mut out = Vec::with_capacity(tables.len());
    for (schema, table) in tables {
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
        // Identifiers are quoted above; nothing else is interpolated.
        let sql = format!(
            "SELECT count(*)::int8,
                    coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::int8::numeric), 0)::text,
                    coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::int8::numeric), 0)::text
               FROM (SELECT md5(t::text) AS h FROM {qualified} t) s"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_one(&mut *conn)
            .await
            .map_err(Error::db(format!("statistics of table {schema}.{table}")))?;
        let rows: i64 = row.get(0);
        let hi: String = row.get(1);
        let lo: String = row.get(2);
        out.push(TableStats {
            schema: schema.clone(),
            table: table.clone(),
            rows,
            checksum: hex::encode(Sha256::digest(format!("{hi}:{lo}"))),
        });
    }
    Ok(out)
}

/// Quotes an identifier the way `quote_ident` does.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A started tool with its stderr being collected.
pub struct Running {
    pub name: String,
    pub child: Child,
    stderr: tokio::task::JoinHandle<String>,
}

impl Running {
    /// Spawns `cmd`, collecting (the start of) its stderr in the background.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self, Error> {
        let mut child = cmd.spawn().map_err(Error::io(format!("cannot start {name}")))?;
        let mut err = child.stderr.take().expect("stderr is piped");
        let stderr = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Keep reading to the end so the tool never blocks on a full pipe.
            while let Ok(n) = err.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                if buf.len() < STDERR_LIMIT {
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            buf.truncate(STDERR_LIMIT);
            String::from_utf8_lossy(&buf).trim().to_owned()
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            stderr,
        })
    }

    /// Waits for the tool; an unsuccessful exit becomes [`Error::Tool`].
    pub async fn finish(mut self) -> Result<(), Error> {
        let status = self
            .child
            .wait()
            .await
            .map_err(Error::io(format!("waiting for {}", self.name)))?;
        let stderr = self.stderr.await.unwrap_or_default();
        if status.success() {
            if !stderr.is_empty() {
                tracing::debug!(tool = %self.name, stderr = %stderr, "tool wrote to stderr");
            }
            Ok(())
        } else {
            Err(Error::Tool {
                tool: self.name,
                status: status.to_string(),
                stderr,
            })
        }
    }
}

/// The first line of `pg_dump --version`, recorded in manifests.
pub async fn tool_version(program: &Path) -> Result<String, Error> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .await
        .map_err(Error::io(format!("cannot run {} --version", program.display())))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// A database created for one restore spot check, dropped when done; a
/// daemon killed meanwhile leaves it to the next sweep (`baton_shared::scratch`).
pub struct Scratch {
    admin: PgTarget,
    pub name: String,
    pub target: PgTarget,
    held: Option<baton_shared::scratch::Held>,
    dropped: bool,
}

impl Scratch {
    /// Creates an empty database from `template0` on the admin URL's server.
    pub async fn create(admin: &PgTarget, name: String) -> Result<Self, Error> {
        let held = baton_shared::scratch::hold(admin.connect().await?, &name)
            .await
            .map_err(Error::db(format!("locking scratch database {name}")))?;
        let mut conn = admin.connect().await?;
        let sql = format!("CREATE DATABASE {} TEMPLATE template0", quote_ident(&name));
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .map_err(Error::db(format!("creating scratch database {name}")))?;
        let _ = conn.close().await;
        tracing::debug!(scratch = %name, "scratch database created");
        baton_shared::failpoint::pause("backup-scratch-created").await;
        Ok(Self {
            target: admin.with_database(&name),
            admin: admin.clone(),
            name,
            held: Some(held),
            dropped: false,
        })
    }

    /// Drops the database, disconnecting anyone still in it. If that fails (or
    /// this future is abandoned), the drop is tried once more in the background.
    pub async fn drop_now(mut self) -> Result<(), Error> {
        let result = drop_database(&self.admin, &self.name).await;
        self.dropped = result.is_ok();
        if self.dropped
            && let Some(held) = self.held.take()
        {
            held.release().await;
        }
        result
    }
}

/// Drops the scratch databases (`prefix…`) that daemons killed mid-check left
/// behind, none a live daemon uses.
pub async fn sweep_scratch(admin: &PgTarget, prefix: &str) -> Result<Vec<String>, Error> {
    let mut conn = admin.connect().await?;
    let dropped = baton_shared::scratch::sweep(&mut conn, prefix)
        .await
        .map_err(Error::db("sweeping leftover scratch databases".to_owned()));
    let _ = conn.close().await;
    dropped
}

impl Drop for Scratch {
    /// The job was abandoned mid-check (cancelled, timed out): drop the scratch
    /// database in the background so it does not linger.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let admin = self.admin.clone();
            let name = self.name.clone();
            let held = self.held.take();
            handle.spawn(async move {
                if let Err(e) = drop_database(&admin, &name).await {
                    tracing::warn!(scratch = %name, error = %e, "scratch database not dropped");
                }
                if let Some(held) = held {
                    held.release().await;
                }
            });
        }
    }
}

async fn drop_database(admin: &PgTarget, name: &str) -> Result<(), Error> {
    let mut conn = admin.connect().await?;
    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name));
    sqlx::query(AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .map_err(Error::db(format!("dropping scratch database {name}")))?;
    let _ = conn.close().await;
    tracing::debug!(scratch = %name, "scratch database dropped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_leaves_the_url() {
        let t = PgTarget::parse("postgres://app:s%40cret@db.internal:6432/shop?sslmode=require").unwrap();
        assert_eq!(t.database(), "shop");
        assert_eq!(t.password.as_ref().unwrap().expose(), "s@cret");
        assert!(!t.url.as_str().contains("cret"), "{}", t.url);
        assert!(t.url.as_str().contains("sslmode=require"));
        let t = PgTarget::parse("postgresql://app@db/shop?password=pw&sslmode=disable").unwrap();
        assert_eq!(t.password.as_ref().unwrap().expose(), "pw");
        assert_eq!(t.url.query(), Some("sslmode=disable"));
        let s = t.with_database("baton_verify_x");
        assert_eq!(s.url.path(), "/baton_verify_x");
        assert!(format!("{s:?}").contains("baton_verify_x") && !format!("{s:?}").contains("pw"));
    }

    #[test]
    fn bad_urls_are_described_without_echo() {
        for bad in ["mysql://u:hunter2@h/db", "postgres://u:hunter2@h", "nonsense hunter2"] {
            let e = PgTarget::parse(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
