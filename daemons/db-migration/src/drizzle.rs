//! Drizzle's migration folder format, read exactly as drizzle-orm's migrator reads it.
//!
//! drizzle-orm 0.45 (`migrator.js`, `readMigrationFiles`) reads `meta/_journal.json`,
//! then for every journal entry, in the journal's order, the file `<tag>.sql`. The file's
//! text is split on the literal `--> statement-breakpoint` (whatever the entry's
//! `breakpoints` flag says, and without trimming), and its hash is the SHA-256 hex of
//! the text. `pg-core/dialect.js` then applies, in one transaction, every entry whose
//! `when` is greater than the `created_at` of the newest row of
//! `drizzle.__drizzle_migrations` (`order by created_at desc limit 1`; a NULL there
//! counts as 0), each chunk as one simple query, followed by
//! `insert into "drizzle"."__drizzle_migrations" ("hash", "created_at") values(hash, when)`.
//!
//! Baton adds two files per migration, which drizzle ignores: `<tag>.down.sql` (the
//! down migration, same breakpoint format) and `<tag>.recovery.md` (how to recover
//! when there is no down migration).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// The separator drizzle-kit writes between statements and drizzle-orm splits on.
pub const BREAKPOINT: &str = "--> statement-breakpoint";

/// Schema and table of drizzle-orm's PostgreSQL migration history (its defaults).
pub const MIGRATIONS_SCHEMA: &str = "drizzle";
pub const MIGRATIONS_TABLE: &str = "__drizzle_migrations";

/// `meta/_journal.json` as drizzle-kit writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Journal {
    pub version: String,
    pub dialect: String,
    pub entries: Vec<JournalEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JournalEntry {
    pub idx: u32,
    pub version: String,
    /// Milliseconds since the epoch when drizzle-kit generated the migration; stored
    /// as `created_at`, and the only thing that decides whether it is pending.
    pub when: i64,
    pub tag: String,
    pub breakpoints: bool,
}

/// One migration with Baton's companions.
#[derive(Debug, Clone)]
pub struct Migration {
    pub idx: u32,
    pub tag: String,
    /// The journal's `when`, recorded as `created_at`.
    pub when: i64,
    /// The `.sql` file's text.
    pub sql: String,
    /// SHA-256 hex of `sql`, as drizzle-orm records it.
    pub hash: String,
    /// The `.down.sql` file's text, if there is a usable one.
    pub down: Option<String>,
    /// The `.recovery.md` file's text, if it says anything.
    pub recovery: Option<String>,
}

impl Migration {
    /// The chunks drizzle-orm executes one by one.
    pub fn statements(&self) -> Vec<&str> {
        split_statements(&self.sql)
    }

    /// The chunks of the down migration, if there is one.
    pub fn down_statements(&self) -> Option<Vec<&str>> {
        self.down.as_deref().map(split_statements)
    }

    /// Irreversible migrations need a documented recovery procedure.
    pub fn is_reversible(&self) -> bool {
        self.down.is_some()
    }

    pub fn down_file(&self) -> String {
        format!("{}.down.sql", self.tag)
    }

    pub fn recovery_file(&self) -> String {
        format!("{}.recovery.md", self.tag)
    }
}

/// Splits like drizzle-orm: on the literal marker, keeping every chunk as it is.
///
/// Chunks that are only whitespace (a file ending in a breakpoint) are dropped:
/// PostgreSQL answers them with an empty response, so executing them or not is the same.
pub fn split_statements(sql: &str) -> Vec<&str> {
    sql.split(BREAKPOINT).filter(|s| !s.trim().is_empty()).collect()
}

/// SHA-256 hex of a migration's text, as `crypto.createHash("sha256").update(query)`.
pub fn hash(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// The text of a file as Node's `Buffer.toString()` decodes it (invalid UTF-8 becomes
/// U+FFFD), so hashes of odd files still agree with drizzle's.
pub fn decode(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The migrations of one folder, in journal order.
#[derive(Debug, Clone)]
pub struct MigrationSet {
    /// Where the folder was read from, for messages (e.g. `drizzle/migrations@<sha>`).
    pub origin: String,
    pub journal: Journal,
    pub migrations: Vec<Migration>,
    /// `.sql` files (not `.down.sql`) the journal does not name, in name order.
    pub unjournaled: Vec<String>,
    /// The newest migration of the history that predates Baton, from the
    /// folder's `baton.baseline` file (see [`BASELINE_FILE`]).
    pub baseline: Option<String>,
}

/// A file in the migrations folder naming, on its first line, the tag of the
/// newest migration written before the repository adopted Baton. Migrations
/// up to it are applied without `.down.sql` or `.recovery.md` companions (the
/// rule is about changes deployed through Baton), and the step's outputs list
/// those it applied that way.
pub const BASELINE_FILE: &str = "baton.baseline";

impl MigrationSet {
    /// Builds the set from the folder's files, keyed by path relative to the folder.
    pub fn from_files(origin: impl Into<String>, files: &BTreeMap<String, Vec<u8>>) -> Result<Self, Error> {
        let origin = origin.into();
        let journal_bytes = files.get("meta/_journal.json").ok_or_else(|| Error::InvalidJournal {
            origin: origin.clone(),
            problem: "meta/_journal.json does not exist".into(),
        })?;
        let journal: Journal = serde_json::from_slice(journal_bytes).map_err(|e| Error::InvalidJournal {
            origin: origin.clone(),
            problem: format!("meta/_journal.json: {e}"),
        })?;
        // drizzle-kit writes "postgresql" (older versions "pg"); a MySQL or SQLite
        // journal would apply garbage here.
        if !matches!(journal.dialect.as_str(), "postgresql" | "pg") {
            return Err(Error::InvalidJournal {
                origin,
                problem: format!("dialect is {:?}, expected \"postgresql\"", journal.dialect),
            });
        }
        let mut migrations = Vec::with_capacity(journal.entries.len());
        for entry in &journal.entries {
            // drizzle would read `<folder>/<tag>.sql` even for `../x`; Baton only reads
            // inside the folder.
            if entry.tag.is_empty() || entry.tag.contains('/') || entry.tag.contains('\\') || entry.tag == ".." {
                return Err(Error::InvalidJournal {
                    origin,
                    problem: format!("entry {} has tag {:?}, which is not a file name", entry.idx, entry.tag),
                });
            }
            if migrations.iter().any(|m: &Migration| m.tag == entry.tag) {
                return Err(Error::InvalidJournal {
                    origin,
                    problem: format!("tag {:?} appears twice", entry.tag),
                });
            }
            let sql_path = format!("{}.sql", entry.tag);
            let sql = decode(files.get(&sql_path).ok_or_else(|| Error::InvalidJournal {
                origin: origin.clone(),
                problem: format!("journal entry {:?} has no file {sql_path}", entry.tag),
            })?);
            // An empty down file is a forgotten one; a deliberate no-op says so in a comment.
            let down = files
                .get(&format!("{}.down.sql", entry.tag))
                .map(|b| decode(b))
                .filter(|s| !s.trim().is_empty());
            let recovery = files
                .get(&format!("{}.recovery.md", entry.tag))
                .map(|b| decode(b))
                .filter(|s| !s.trim().is_empty());
            migrations.push(Migration {
                idx: entry.idx,
                tag: entry.tag.clone(),
                when: entry.when,
                hash: hash(&sql),
                sql,
                down,
                recovery,
            });
        }
        let unjournaled = files
            .keys()
            .filter(|p| !p.contains('/') && p.ends_with(".sql") && !p.ends_with(".down.sql"))
            .filter(|p| !migrations.iter().any(|m| format!("{}.sql", m.tag) == **p))
            .cloned()
            .collect();
        let baseline = match files.get(BASELINE_FILE) {
            None => None,
            Some(bytes) => {
                let text = decode(bytes);
                let tag = text
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .unwrap_or_default()
                    .to_owned();
                if !migrations.iter().any(|m| m.tag == tag) {
                    return Err(Error::InvalidJournal {
                        origin,
                        problem: format!(
                            "{BASELINE_FILE} names {tag:?}, which is not a journal entry (it names the newest \
                             migration written before the repository adopted Baton)"
                        ),
                    });
                }
                Some(tag)
            }
        };
        Ok(Self {
            origin,
            journal,
            migrations,
            unjournaled,
            baseline,
        })
    }

    /// Reads a migrations folder from disk (tests, local tooling).
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let mut files = BTreeMap::new();
        let origin = dir.display().to_string();
        let io = |e: std::io::Error| Error::InvalidJournal {
            origin: origin.clone(),
            problem: e.to_string(),
        };
        for sub in ["", "meta"] {
            let d = dir.join(sub);
            if !d.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&d).map_err(io)? {
                let entry = entry.map_err(io)?;
                if entry.file_type().map_err(io)?.is_file() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let key = if sub.is_empty() { name } else { format!("{sub}/{name}") };
                    files.insert(key, std::fs::read(entry.path()).map_err(io)?);
                }
            }
        }
        Self::from_files(origin.clone(), &files)
    }

    /// The migrations drizzle-orm would apply to a database whose newest
    /// `created_at` is `last` (None: no history at all).
    pub fn pending(&self, last: Option<i64>) -> Vec<&Migration> {
        self.migrations
            .iter()
            .filter(|m| last.is_none_or(|l| l < m.when))
            .collect()
    }

    /// Journal entries drizzle-orm skips for ever: not applied, but no newer
    /// than the newest applied `created_at`, so its rule never finds them
    /// pending. Each with the tag (or `created_at`) of the newest applied entry.
    pub fn older_than_applied(&self, history: &crate::db::History) -> Vec<(&Migration, String)> {
        let Some(last) = history.last else {
            return Vec::new();
        };
        let newest = history
            .rows
            .iter()
            .filter(|r| r.created_at == Some(last))
            .find_map(|r| self.migrations.iter().find(|m| m.hash == r.hash))
            .map_or_else(|| format!("a migration created at {last}"), |m| m.tag.clone());
        self.migrations
            .iter()
            .filter(|m| m.when <= last && !history.rows.iter().any(|r| r.created_at == Some(m.when)))
            .map(|m| (m, newest.clone()))
            .collect()
    }

    /// Entries whose file changed after they were applied: the history has a
    /// row with their `created_at` but another hash.
    pub fn changed_after_applied(&self, history: &crate::db::History) -> Vec<&Migration> {
        self.migrations
            .iter()
            .filter(|m| history.rows.iter().any(|r| r.created_at == Some(m.when)) && !history.contains(&m.hash, m.when))
            .collect()
    }

    /// Whether `m` predates the repository's adoption of Baton (it is the
    /// baseline or comes before it in the journal).
    pub fn predates_adoption(&self, m: &Migration) -> bool {
        self.baseline
            .as_deref()
            .and_then(|b| self.migrations.iter().position(|x| x.tag == b))
            .zip(self.migrations.iter().position(|x| x.tag == m.tag))
            .is_some_and(|(baseline, at)| at <= baseline)
    }

    pub fn get(&self, tag: &str) -> Option<&Migration> {
        self.migrations.iter().find(|m| m.tag == tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    const JOURNAL: &str = r#"{
  "version": "7",
  "dialect": "postgresql",
  "entries": [
    { "idx": 0, "version": "7", "when": 1000, "tag": "0000_a", "breakpoints": true },
    { "idx": 1, "version": "7", "when": 2000, "tag": "0001_b", "breakpoints": true }
  ]
}"#;

    #[test]
    fn statements_split_on_the_literal_marker_like_drizzle() {
        let sql = "CREATE TABLE \"a\" (\n\t\"id\" serial\n);\n--> statement-breakpoint\nALTER TABLE \"a\" ADD COLUMN \"b\" text;--> statement-breakpoint\n";
        assert_eq!(
            split_statements(sql),
            vec![
                "CREATE TABLE \"a\" (\n\t\"id\" serial\n);\n",
                "\nALTER TABLE \"a\" ADD COLUMN \"b\" text;"
            ]
        );
    }

    #[test]
    fn hash_is_sha256_hex_of_the_text() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn pending_follows_drizzle_newest_created_at_rule() {
        let set = MigrationSet::from_files(
            "t",
            &files(&[
                ("meta/_journal.json", JOURNAL),
                ("0000_a.sql", "select 1"),
                ("0001_b.sql", "select 2"),
            ]),
        )
        .unwrap();
        assert_eq!(set.pending(None).len(), 2);
        assert_eq!(set.pending(Some(0)).len(), 2);
        assert_eq!(
            set.pending(Some(1000)).iter().map(|m| &m.tag).collect::<Vec<_>>(),
            ["0001_b"]
        );
        assert!(set.pending(Some(2000)).is_empty());
    }

    #[test]
    fn missing_sql_file_is_named() {
        let err = MigrationSet::from_files("t", &files(&[("meta/_journal.json", JOURNAL), ("0000_a.sql", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("0001_b.sql"), "{err}");
    }

    #[test]
    fn empty_down_and_recovery_files_do_not_count() {
        let set = MigrationSet::from_files(
            "t",
            &files(&[
                ("meta/_journal.json", JOURNAL),
                ("0000_a.sql", "select 1"),
                ("0000_a.down.sql", "  \n"),
                ("0000_a.recovery.md", ""),
                ("0001_b.sql", "select 2"),
                ("0001_b.down.sql", "-- nothing to undo\n"),
            ]),
        )
        .unwrap();
        assert!(!set.migrations[0].is_reversible() && set.migrations[0].recovery.is_none());
        assert!(set.migrations[1].is_reversible());
    }

    #[test]
    fn other_dialects_are_refused() {
        let j = JOURNAL.replace("postgresql", "mysql");
        let err = MigrationSet::from_files("t", &files(&[("meta/_journal.json", &j)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mysql"), "{err}");
    }
}
