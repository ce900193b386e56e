//! Finds destructive statements in migration SQL.
//!
//! A statement is destructive when it can lose data or structure that the running
//! application uses: any `DROP …`, `ALTER TABLE … DROP [COLUMN | CONSTRAINT]`,
//! `ALTER … [SET DATA] TYPE`, any `RENAME` (including `SET SCHEMA`), `TRUNCATE`, and
//! `DELETE` without a `WHERE`. A set with one of those needs a verified backup before
//! it runs in production. Renames and drops of columns, tables, views and schemas also
//! break the seed's additive-first rule ("never rename/remove and deploy
//! simultaneously") and produce warnings.
//!
//! The scanner is a PostgreSQL tokenizer, not a parser: it knows comments (nested
//! `/* */` too), string literals (`E''` escapes), dollar quoting and quoted
//! identifiers, so keywords inside them never count, and it looks at the shape of each
//! statement. `DO` blocks are scanned inside; dynamic SQL (`EXECUTE 'text'`) and
//! statements inside data-modifying CTEs are not. `UPDATE` is not flagged: backfilling
//! a new column is the additive-first rule's own middle step.

use std::fmt;

/// One destructive statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// The statement, whitespace collapsed and shortened, for messages.
    pub statement: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindingKind {
    /// `DROP <object> <name>`; `object` in lowercase words, e.g. `materialized view`.
    Drop {
        object: String,
        name: String,
    },
    DropColumn {
        table: String,
        column: String,
    },
    DropConstraint {
        table: String,
        constraint: String,
    },
    AlterColumnType {
        table: String,
        column: String,
    },
    /// Any rename; `what` describes it, e.g. `column users.name`.
    Rename {
        what: String,
    },
    Truncate {
        tables: String,
    },
    DeleteWithoutWhere {
        table: String,
    },
}

impl FindingKind {
    /// Whether this breaks "migrations are additive first": a rename, or a removal of
    /// something application code reads.
    pub fn breaks_additive_first(&self) -> bool {
        match self {
            Self::Rename { .. } | Self::DropColumn { .. } => true,
            Self::Drop { object, .. } => matches!(
                object.as_str(),
                "table" | "view" | "materialized view" | "schema" | "foreign table"
            ),
            _ => false,
        }
    }
}

impl FindingKind {
    /// The identifier that stops existing under its name, for findings that
    /// break the additive-first rule: the dropped column, table, view or schema,
    /// or the old name of a renamed object (schema prefix and quotes removed).
    pub fn removed_name(&self) -> Option<String> {
        if !self.breaks_additive_first() {
            return None;
        }
        let qualified = match self {
            Self::DropColumn { column, .. } => column.as_str(),
            Self::Drop { name, .. } => name.as_str(),
            Self::Rename { what } => {
                // "column <old> of <table>", or "<object words> <name>", either
                // possibly followed by " (moves it to another schema)".
                let what = what.split(" (").next().unwrap_or(what);
                let what = what.split(" to ").next().unwrap_or(what);
                match what.strip_prefix("column ") {
                    Some(rest) => rest.split(" of ").next().unwrap_or(rest),
                    None => what.rsplit(' ').next().unwrap_or(what),
                }
            }
            _ => return None,
        };
        let last = qualified.rsplit('.').next().unwrap_or(qualified);
        let name = last.trim_matches('"');
        (!name.is_empty()).then(|| name.to_owned())
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Drop { object, name } => write!(f, "drops {object} {name}"),
            Self::DropColumn { table, column } => write!(f, "drops column {column} of {table}"),
            Self::DropConstraint { table, constraint } => write!(f, "drops constraint {constraint} of {table}"),
            Self::AlterColumnType { table, column } => write!(f, "changes the type of column {column} of {table}"),
            Self::Rename { what } => write!(f, "renames {what}"),
            Self::Truncate { tables } => write!(f, "truncates {tables}"),
            Self::DeleteWithoutWhere { table } => write!(f, "deletes every row of {table} (DELETE without WHERE)"),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind, self.statement)
    }
}

/// Scans SQL text (one or more `;`-separated statements).
pub fn analyze(sql: &str) -> Vec<Finding> {
    let tokens = tokenize(sql);
    let mut out = Vec::new();
    for stmt in tokens.split(|t| t.kind == Kind::Punct(';')) {
        if !stmt.is_empty() {
            analyze_statement(sql, stmt, &mut out);
        }
    }
    out
}

/// A statement that cannot run inside the one transaction a deploy's
/// migrations are applied in: transaction control would end that transaction
/// early (what came before it would stay committed if a later migration
/// failed), and some statements refuse to run in a transaction at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotTransactional {
    /// The statement, whitespace collapsed and shortened.
    pub statement: String,
    pub why: &'static str,
    /// The PostgreSQL version (`server_version_num`) from which it may run in
    /// a transaction; `None`: never.
    pub allowed_from: Option<i32>,
}

/// The statements of `sql` that cannot run inside Baton's migration
/// transaction (see [`NotTransactional`]).
pub fn not_transactional(sql: &str) -> Vec<NotTransactional> {
    let tokens = tokenize(sql);
    let mut out = Vec::new();
    // A SQL-standard function body (`BEGIN ATOMIC … END`) holds semicolons
    // that end no top-level statement.
    let mut in_atomic_body = false;
    for stmt in tokens.split(|t| t.kind == Kind::Punct(';')) {
        let words: Vec<&str> = stmt
            .iter()
            .take_while(|t| t.kind == Kind::Word)
            .map(|t| t.text.as_str())
            .collect();
        if in_atomic_body {
            if words.first() == Some(&"END") {
                in_atomic_body = false;
            }
            continue;
        }
        if stmt.windows(2).any(|w| {
            w[0].kind == Kind::Word && w[0].text == "BEGIN" && w[1].kind == Kind::Word && w[1].text == "ATOMIC"
        }) {
            in_atomic_body = !stmt.last().is_some_and(|t| t.kind == Kind::Word && t.text == "END");
            continue;
        }
        let Some(first) = words.first().copied() else {
            continue;
        };
        let has = |w: &str| top_level_word(stmt, w).is_some();
        let control = "transaction control, which would end the migration transaction early";
        let found = match first {
            "BEGIN" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE" => Some((control, None)),
            "START" if words.get(1) == Some(&"TRANSACTION") => Some((control, None)),
            "PREPARE" if words.get(1) == Some(&"TRANSACTION") => Some((control, None)),
            "CREATE" | "DROP" | "REINDEX" if has("CONCURRENTLY") => {
                Some(("CONCURRENTLY, which cannot run inside a transaction", None))
            }
            "VACUUM" => Some(("VACUUM, which cannot run inside a transaction", None)),
            "CREATE" | "DROP" | "ALTER" if matches!(words.get(1), Some(&("DATABASE" | "TABLESPACE" | "SYSTEM"))) => {
                Some(("a statement that cannot run inside a transaction", None))
            }
            "ALTER" if words.get(1) == Some(&"TYPE") && has("ADD") && has("VALUE") => Some((
                "ALTER TYPE … ADD VALUE, which PostgreSQL before 12 cannot run inside a transaction",
                Some(120_000),
            )),
            _ => None,
        };
        if let Some((why, allowed_from)) = found {
            out.push(NotTransactional {
                statement: excerpt(sql, stmt),
                why,
                allowed_from,
            });
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Unquoted word; `text` holds it uppercased.
    Word,
    /// `"quoted identifier"`; `text` holds the unescaped name.
    QuotedIdent,
    /// String literal or dollar-quoted body; `text` holds the contents.
    Str,
    Punct(char),
    Other,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    text: String,
    start: usize,
    end: usize,
}

fn tokenize(sql: &str) -> Vec<Token> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            // PostgreSQL block comments nest.
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'\'' {
            let backslash = out
                .last()
                .is_some_and(|t: &Token| t.kind == Kind::Word && t.end == i && t.text == "E");
            if backslash {
                out.pop();
            }
            let (text, end) = quoted(b, i, b'\'', backslash);
            out.push(Token {
                kind: Kind::Str,
                text,
                start,
                end,
            });
            i = end;
        } else if c == b'"' {
            let (text, end) = quoted(b, i, b'"', false);
            out.push(Token {
                kind: Kind::QuotedIdent,
                text,
                start,
                end,
            });
            i = end;
        } else if c == b'$'
            && let Some(tag_end) = dollar_tag(b, i)
        {
            let tag = &sql[i..tag_end];
            let body_start = tag_end;
            let (body_end, end) = match sql[body_start..].find(tag) {
                Some(p) => (body_start + p, body_start + p + tag.len()),
                None => (b.len(), b.len()),
            };
            out.push(Token {
                kind: Kind::Str,
                text: sql[body_start..body_end].to_owned(),
                start,
                end,
            });
            i = end;
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80) {
                i += 1;
            }
            out.push(Token {
                kind: Kind::Word,
                text: sql[start..i].to_uppercase(),
                start,
                end: i,
            });
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            out.push(Token {
                kind: Kind::Other,
                text: sql[start..i].to_owned(),
                start,
                end: i,
            });
        } else {
            // Multi-byte characters only occur in words, strings and comments above.
            i += 1;
            let kind = if matches!(c, b';' | b'(' | b')' | b',' | b'.') {
                Kind::Punct(c as char)
            } else {
                Kind::Other
            };
            out.push(Token {
                kind,
                text: (c as char).to_string(),
                start,
                end: i,
            });
        }
    }
    out
}

/// A quoted token starting at `i`; doubled quotes escape, and with `backslash` so does `\`.
fn quoted(b: &[u8], i: usize, q: u8, backslash: bool) -> (String, usize) {
    let mut j = i + 1;
    let mut text = Vec::new();
    while j < b.len() {
        if backslash && b[j] == b'\\' && j + 1 < b.len() {
            text.push(b[j + 1]);
            j += 2;
        } else if b[j] == q {
            if b.get(j + 1) == Some(&q) {
                text.push(q);
                j += 2;
            } else {
                return (String::from_utf8_lossy(&text).into_owned(), j + 1);
            }
        } else {
            text.push(b[j]);
            j += 1;
        }
    }
    (String::from_utf8_lossy(&text).into_owned(), b.len())
}

/// The end of a `$tag$` opener at `i`, if there is one (`$1` is a parameter).
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if j < b.len() && b[j].is_ascii_digit() {
        return None;
    }
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    (b.get(j) == Some(&b'$')).then_some(j + 1)
}

fn is_word(t: Option<&Token>, w: &str) -> bool {
    t.is_some_and(|t| t.kind == Kind::Word && t.text == w)
}

/// A word or quoted identifier, as PostgreSQL folds it.
fn ident(t: &Token, sql: &str) -> Option<String> {
    match t.kind {
        Kind::Word => Some(sql[t.start..t.end].to_lowercase()),
        Kind::QuotedIdent => Some(t.text.clone()),
        _ => None,
    }
}

/// A possibly qualified name starting at `i`: (name, index after it).
fn qualified_name(sql: &str, toks: &[Token], mut i: usize) -> (String, usize) {
    let mut parts = Vec::new();
    while let Some(t) = toks.get(i) {
        let Some(p) = ident(t, sql) else { break };
        parts.push(p);
        i += 1;
        if toks.get(i).is_some_and(|t| t.kind == Kind::Punct('.')) {
            i += 1;
        } else {
            break;
        }
    }
    if parts.is_empty() {
        ("?".to_owned(), i)
    } else {
        (parts.join("."), i)
    }
}

/// Skips `IF EXISTS` / `IF NOT EXISTS`.
fn skip_if_exists(toks: &[Token], mut i: usize) -> usize {
    if is_word(toks.get(i), "IF") {
        i += 1;
        if is_word(toks.get(i), "NOT") {
            i += 1;
        }
        if is_word(toks.get(i), "EXISTS") {
            i += 1;
        }
    }
    i
}

/// Splits tokens at top-level (not parenthesised) commas.
fn top_level_split(toks: &[Token]) -> Vec<&[Token]> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut from = 0;
    for (i, t) in toks.iter().enumerate() {
        match t.kind {
            Kind::Punct('(') => depth += 1,
            Kind::Punct(')') => depth -= 1,
            Kind::Punct(',') if depth == 0 => {
                parts.push(&toks[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&toks[from..]);
    parts
}

/// Indexes of top-level words equal to `w`.
fn top_level_word(toks: &[Token], w: &str) -> Option<usize> {
    let mut depth = 0i32;
    for (i, t) in toks.iter().enumerate() {
        match t.kind {
            Kind::Punct('(') => depth += 1,
            Kind::Punct(')') => depth -= 1,
            Kind::Word if depth == 0 && t.text == w => return Some(i),
            _ => {}
        }
    }
    None
}

fn excerpt(sql: &str, toks: &[Token]) -> String {
    let (Some(first), Some(last)) = (toks.first(), toks.last()) else {
        return String::new();
    };
    let text = sql[first.start..last.end]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if text.chars().count() > 160 {
        let cut: String = text.chars().take(157).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// Object kinds of `DROP` that take two words.
const TWO_WORD_OBJECTS: &[&str] = &["MATERIALIZED", "FOREIGN", "EVENT", "ACCESS", "TEXT", "USER", "OPERATOR"];

fn analyze_statement(sql: &str, toks: &[Token], out: &mut Vec<Finding>) {
    let push = |out: &mut Vec<Finding>, kind: FindingKind| {
        out.push(Finding {
            kind,
            statement: excerpt(sql, toks),
        })
    };
    let Some(first) = toks.first() else { return };
    if first.kind != Kind::Word {
        return;
    }
    match first.text.as_str() {
        "DROP" => {
            let mut i = 1;
            let mut object = Vec::new();
            if let Some(t) = toks.get(i).filter(|t| t.kind == Kind::Word) {
                object.push(t.text.to_lowercase());
                i += 1;
                if TWO_WORD_OBJECTS.contains(&t.text.as_str())
                    && let Some(t2) = toks.get(i).filter(|t| t.kind == Kind::Word)
                {
                    object.push(t2.text.to_lowercase());
                    i += 1;
                }
            }
            if is_word(toks.get(i), "CONCURRENTLY") {
                i += 1;
            }
            i = skip_if_exists(toks, i);
            let names: Vec<String> = top_level_split(&toks[i.min(toks.len())..])
                .into_iter()
                .map(|part| qualified_name(sql, part, 0).0)
                .collect();
            push(
                out,
                FindingKind::Drop {
                    object: object.join(" "),
                    name: names.join(", "),
                },
            );
        }
        "TRUNCATE" => {
            let mut i = 1;
            if is_word(toks.get(i), "TABLE") {
                i += 1;
            }
            if is_word(toks.get(i), "ONLY") {
                i += 1;
            }
            let tables: Vec<String> = top_level_split(&toks[i.min(toks.len())..])
                .into_iter()
                .map(|part| qualified_name(sql, part, 0).0)
                .collect();
            push(
                out,
                FindingKind::Truncate {
                    tables: tables.join(", "),
                },
            );
        }
        "DELETE" => delete(sql, toks, 0, out),
        "WITH" => {
            if let Some(d) = top_level_word(toks, "DELETE") {
                delete(sql, toks, d, out);
            }
        }
        "ALTER" => alter(sql, toks, out),
        "DO" => {
            // `DO [LANGUAGE x] $$ body $$`: the body runs now, so scan it.
            if let Some(body) = toks.iter().find(|t| t.kind == Kind::Str) {
                out.extend(analyze_block(&body.text));
            }
        }
        _ => {}
    }
}

/// Scans a PL/pgSQL block: each statement is looked at from its first DDL/DML word,
/// which skips `BEGIN`, `IF … THEN` and the like.
fn analyze_block(body: &str) -> Vec<Finding> {
    let tokens = tokenize(body);
    let mut out = Vec::new();
    for stmt in tokens.split(|t| t.kind == Kind::Punct(';')) {
        let mut depth = 0i32;
        let start = stmt.iter().position(|t| {
            match t.kind {
                Kind::Punct('(') => depth += 1,
                Kind::Punct(')') => depth -= 1,
                _ => {}
            }
            depth == 0
                && t.kind == Kind::Word
                && matches!(t.text.as_str(), "DROP" | "ALTER" | "TRUNCATE" | "DELETE" | "DO")
        });
        if let Some(s) = start {
            analyze_statement(body, &stmt[s..], &mut out);
        }
    }
    out
}

fn delete(sql: &str, toks: &[Token], at: usize, out: &mut Vec<Finding>) {
    let rest = &toks[at..];
    if top_level_word(rest, "WHERE").is_some() {
        return;
    }
    let mut i = 1;
    if is_word(rest.get(i), "FROM") {
        i += 1;
    }
    if is_word(rest.get(i), "ONLY") {
        i += 1;
    }
    let (table, _) = qualified_name(sql, rest, i);
    out.push(Finding {
        kind: FindingKind::DeleteWithoutWhere { table },
        statement: excerpt(sql, toks),
    });
}

fn alter(sql: &str, toks: &[Token], out: &mut Vec<Finding>) {
    let push = |out: &mut Vec<Finding>, kind: FindingKind| {
        out.push(Finding {
            kind,
            statement: excerpt(sql, toks),
        })
    };
    let mut i = 1;
    let table_like = if is_word(toks.get(i), "TABLE") {
        i += 1;
        true
    } else if is_word(toks.get(i), "FOREIGN") && is_word(toks.get(i + 1), "TABLE") {
        i += 2;
        true
    } else {
        false
    };
    if !table_like {
        // ALTER INDEX/SEQUENCE/VIEW/SCHEMA/TYPE/...: only renames and moves concern us.
        let object = toks
            .get(1)
            .filter(|t| t.kind == Kind::Word)
            .map(|t| t.text.to_lowercase())
            .unwrap_or_default();
        let mut j = 2;
        if object == "materialized" {
            j += 1;
        }
        j = skip_if_exists(toks, j);
        let (name, _) = qualified_name(sql, toks, j);
        if top_level_word(toks, "RENAME").is_some() {
            let object = if object == "materialized" {
                "materialized view".to_owned()
            } else {
                object
            };
            push(
                out,
                FindingKind::Rename {
                    what: format!("{object} {name}"),
                },
            );
        } else if let Some(s) = top_level_word(toks, "SET")
            && is_word(toks.get(s + 1), "SCHEMA")
        {
            push(
                out,
                FindingKind::Rename {
                    what: format!("{object} {name} (moves it to another schema)"),
                },
            );
        }
        return;
    }
    i = skip_if_exists(toks, i);
    if is_word(toks.get(i), "ONLY") {
        i += 1;
    }
    let (table, after) = qualified_name(sql, toks, i);
    let mut i = after;
    if toks.get(i).is_some_and(|t| t.kind == Kind::Other && t.text == "*") {
        i += 1;
    }
    let actions = &toks[i.min(toks.len())..];
    // RENAME is a single action.
    if is_word(actions.first(), "RENAME") {
        let what = if is_word(actions.get(1), "TO") {
            let (new, _) = qualified_name(sql, actions, 2);
            format!("table {table} to {new}")
        } else if is_word(actions.get(1), "CONSTRAINT") {
            let (old, _) = qualified_name(sql, actions, 2);
            format!("constraint {old} of {table}")
        } else {
            let from = if is_word(actions.get(1), "COLUMN") { 2 } else { 1 };
            let (old, _) = qualified_name(sql, actions, from);
            format!("column {old} of {table}")
        };
        push(out, FindingKind::Rename { what });
        return;
    }
    for action in top_level_split(actions) {
        let Some(head) = action.first().filter(|t| t.kind == Kind::Word) else {
            continue;
        };
        match head.text.as_str() {
            "DROP" => {
                if is_word(action.get(1), "CONSTRAINT") {
                    let j = skip_if_exists(action, 2);
                    let (constraint, _) = qualified_name(sql, action, j);
                    push(
                        out,
                        FindingKind::DropConstraint {
                            table: table.clone(),
                            constraint,
                        },
                    );
                } else {
                    let j = if is_word(action.get(1), "COLUMN") { 2 } else { 1 };
                    let j = skip_if_exists(action, j);
                    let (column, _) = qualified_name(sql, action, j);
                    push(
                        out,
                        FindingKind::DropColumn {
                            table: table.clone(),
                            column,
                        },
                    );
                }
            }
            "ALTER" => {
                let j = if is_word(action.get(1), "COLUMN") { 2 } else { 1 };
                let (column, k) = qualified_name(sql, action, j);
                let retyped = is_word(action.get(k), "TYPE")
                    || (is_word(action.get(k), "SET")
                        && is_word(action.get(k + 1), "DATA")
                        && is_word(action.get(k + 2), "TYPE"));
                if retyped {
                    push(
                        out,
                        FindingKind::AlterColumnType {
                            table: table.clone(),
                            column,
                        },
                    );
                }
            }
            "SET" if is_word(action.get(1), "SCHEMA") => push(
                out,
                FindingKind::Rename {
                    what: format!("table {table} (moves it to another schema)"),
                },
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<FindingKind> {
        analyze(sql).into_iter().map(|f| f.kind).collect()
    }

    fn flagged(sql: &str) -> bool {
        !analyze(sql).is_empty()
    }

    #[test]
    fn drops_are_destructive() {
        for sql in [
            "DROP TABLE \"orders\" CASCADE;",
            "drop table if exists public.orders",
            "DROP SCHEMA legacy CASCADE",
            "DROP INDEX CONCURRENTLY IF EXISTS \"orders_user_id_idx\";",
            "DROP MATERIALIZED VIEW stats",
            "DROP VIEW v",
            "DROP TYPE \"public\".\"status\";",
            "DROP SEQUENCE s",
        ] {
            assert!(flagged(sql), "{sql}");
        }
        assert_eq!(
            kinds("DROP TABLE \"public\".\"orders\", audit;"),
            [FindingKind::Drop {
                object: "table".into(),
                name: "public.orders, audit".into()
            }]
        );
        assert_eq!(
            kinds("drop materialized view if exists stats"),
            [FindingKind::Drop {
                object: "materialized view".into(),
                name: "stats".into()
            }]
        );
    }

    #[test]
    fn column_drops_and_type_changes_are_destructive() {
        assert_eq!(
            kinds("ALTER TABLE \"orders\" DROP COLUMN \"legacy_note\";"),
            [FindingKind::DropColumn {
                table: "orders".into(),
                column: "legacy_note".into()
            }]
        );
        assert_eq!(
            kinds("alter table only orders drop legacy_note"),
            [FindingKind::DropColumn {
                table: "orders".into(),
                column: "legacy_note".into()
            }]
        );
        assert_eq!(
            kinds("ALTER TABLE \"users\" ALTER COLUMN \"age\" SET DATA TYPE integer;"),
            [FindingKind::AlterColumnType {
                table: "users".into(),
                column: "age".into()
            }]
        );
        assert_eq!(
            kinds("ALTER TABLE users ALTER age TYPE bigint USING age::bigint"),
            [FindingKind::AlterColumnType {
                table: "users".into(),
                column: "age".into()
            }]
        );
        assert_eq!(
            kinds("ALTER TABLE t ADD COLUMN a int, DROP COLUMN IF EXISTS b, DROP CONSTRAINT t_c_check"),
            [
                FindingKind::DropColumn {
                    table: "t".into(),
                    column: "b".into()
                },
                FindingKind::DropConstraint {
                    table: "t".into(),
                    constraint: "t_c_check".into()
                }
            ]
        );
    }

    #[test]
    fn transaction_control_and_statements_outside_transactions_are_found() {
        let found = |sql: &str| -> Vec<String> { not_transactional(sql).into_iter().map(|n| n.statement).collect() };
        assert_eq!(found("BEGIN;\nCREATE TABLE a (id int);\nCOMMIT;"), ["BEGIN", "COMMIT"]);
        assert_eq!(found("start transaction; savepoint s; release s; rollback;").len(), 4);
        assert_eq!(
            found("CREATE UNIQUE INDEX CONCURRENTLY \"i\" ON \"t\" (\"c\");"),
            ["CREATE UNIQUE INDEX CONCURRENTLY \"i\" ON \"t\" (\"c\")"]
        );
        let add = not_transactional("ALTER TYPE \"mood\" ADD VALUE 'meh';");
        assert_eq!(add[0].allowed_from, Some(120_000));
        // Not transaction control: words in strings, DO blocks, function bodies.
        assert!(found("INSERT INTO t VALUES ('BEGIN; COMMIT;');").is_empty());
        assert!(found("DO $$ BEGIN PERFORM 1; END $$;").is_empty());
        assert!(
            found(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END;\nCREATE TABLE b (id int);"
            )
            .is_empty()
        );
        assert!(found("CREATE INDEX \"i\" ON \"t\" (\"c\");").is_empty());
    }

    #[test]
    fn removed_names_are_the_old_identifiers() {
        let names: Vec<Option<String>> = [
            "ALTER TABLE \"users\" RENAME COLUMN \"name\" TO \"full_name\";",
            "ALTER TABLE \"users\" DROP COLUMN \"email\";",
            "DROP TABLE \"public\".\"orders\";",
            "ALTER TABLE \"users\" RENAME TO \"people\";",
            "DROP INDEX \"i\";",
        ]
        .iter()
        .map(|sql| analyze(sql).first().and_then(|f| f.kind.removed_name()))
        .collect();
        assert_eq!(
            names,
            [
                Some("name".into()),
                Some("email".into()),
                Some("orders".into()),
                Some("users".into()),
                None
            ]
        );
    }

    #[test]
    fn renames_are_destructive_and_named() {
        assert_eq!(
            kinds("ALTER TABLE \"users\" RENAME COLUMN \"name\" TO \"full_name\";"),
            [FindingKind::Rename {
                what: "column name of users".into()
            }]
        );
        assert_eq!(
            kinds("alter table users rename to customers"),
            [FindingKind::Rename {
                what: "table users to customers".into()
            }]
        );
        assert!(flagged("ALTER INDEX i RENAME TO j"));
        assert!(flagged("ALTER TYPE status RENAME VALUE 'a' TO 'b'"));
        assert!(flagged("ALTER TABLE t SET SCHEMA archive"));
        assert!(flagged("ALTER TABLE t RENAME CONSTRAINT a TO b"));
    }

    #[test]
    fn truncate_and_unfiltered_delete_are_destructive() {
        assert_eq!(
            kinds("TRUNCATE TABLE sessions, tokens"),
            [FindingKind::Truncate {
                tables: "sessions, tokens".into()
            }]
        );
        assert_eq!(
            kinds("DELETE FROM \"sessions\";"),
            [FindingKind::DeleteWithoutWhere {
                table: "sessions".into()
            }]
        );
        assert!(flagged("DELETE FROM t USING (SELECT id FROM u WHERE u.x) AS s"));
        assert!(flagged("WITH old AS (SELECT 1) DELETE FROM t"));
    }

    #[test]
    fn additive_statements_are_not_flagged() {
        for sql in [
            "ALTER TABLE \"users\" ADD COLUMN \"nickname\" text;",
            "CREATE INDEX \"orders_user_id_idx\" ON \"orders\" USING btree (\"user_id\");",
            "CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)",
            "DELETE FROM sessions WHERE expires_at < now()",
            "WITH x AS (SELECT 1) DELETE FROM t WHERE id IN (SELECT * FROM x)",
            "CREATE TABLE \"users\" (\n\t\"id\" serial PRIMARY KEY NOT NULL\n);",
            "ALTER TABLE \"orders\" ADD CONSTRAINT \"fk\" FOREIGN KEY (\"user_id\") REFERENCES \"public\".\"users\"(\"id\") ON DELETE cascade ON UPDATE no action;",
            "ALTER TABLE users ALTER COLUMN email SET NOT NULL",
            "ALTER TABLE users ALTER COLUMN email DROP DEFAULT",
            "ALTER TABLE users ALTER COLUMN email DROP NOT NULL",
            "UPDATE users SET nickname = name",
            "INSERT INTO audit (what) VALUES ('DROP TABLE users; TRUNCATE x')",
            "SELECT 'it''s DELETE FROM t' -- DROP TABLE x\n",
            "/* DROP TABLE a /* nested */ still comment */ SELECT 1",
            "SELECT E'\\' DROP TABLE x'",
            "COMMENT ON COLUMN users.name IS 'rename me later'",
            "ALTER TYPE status ADD VALUE 'archived'",
            "CREATE FUNCTION f() RETURNS void AS $body$ DELETE FROM t $body$ LANGUAGE sql",
            "ALTER SEQUENCE s RESTART WITH 10",
        ] {
            assert!(!flagged(sql), "{sql}: {:?}", analyze(sql));
        }
    }

    #[test]
    fn do_blocks_are_scanned_inside() {
        let sql = "DO $$ BEGIN\n ALTER TABLE \"orders\" ADD CONSTRAINT \"fk\" FOREIGN KEY (\"user_id\") REFERENCES \"users\"(\"id\");\nEXCEPTION\n WHEN duplicate_object THEN null;\nEND $$;";
        assert!(!flagged(sql), "{:?}", analyze(sql));
        let sql = "DO $$ BEGIN IF EXISTS (SELECT 1) THEN DROP TABLE legacy; END IF; END $$;";
        assert_eq!(
            kinds(sql),
            [FindingKind::Drop {
                object: "table".into(),
                name: "legacy".into()
            }]
        );
    }

    #[test]
    fn several_statements_are_scanned_separately() {
        let sql = "ALTER TABLE a ADD COLUMN b int; DROP TABLE c; SELECT 1";
        assert_eq!(analyze(sql).len(), 1);
        assert_eq!(analyze(sql)[0].statement, "DROP TABLE c");
    }

    #[test]
    fn additive_first_warnings_cover_renames_and_removals_only() {
        let w = |sql: &str| analyze(sql).iter().any(|f| f.kind.breaks_additive_first());
        assert!(w("ALTER TABLE t RENAME COLUMN a TO b"));
        assert!(w("ALTER TABLE t DROP COLUMN a"));
        assert!(w("DROP TABLE t"));
        assert!(!w("DROP INDEX i"));
        assert!(!w("TRUNCATE t"));
        assert!(!w("ALTER TABLE t ALTER COLUMN a TYPE bigint"));
    }
}
