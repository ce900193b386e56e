//! The seed's rules on a Dockerfile, checked before anything is built: every
//! image a build starts from or copies from is pinned by digest, and no image
//! reference uses `latest`.
//!
//! The file is read as BuildKit and buildah read it: logical lines joined at the
//! escape character (`\`, or the one an `# escape=` directive sets), comments and
//! empty lines skipped, instructions case-insensitive, global `ARG`s (before the
//! first `FROM`) substituted into `FROM`. A stage name (`FROM … AS build`) and
//! `scratch` need no pin; `COPY --from=` may name a stage, a stage index or an image.

use std::collections::BTreeMap;

/// Why a Dockerfile is refused, at which line (1-based, where the instruction starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub line: usize,
    /// `base_not_pinned`, `latest_tag` or `invalid_dockerfile`.
    pub rule: &'static str,
    pub problem: String,
}

/// An image the build uses, as written and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUse {
    pub line: usize,
    pub reference: String,
}

/// What the checks found: the images used (all pinned) and the stage count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub images: Vec<ImageUse>,
    pub stages: usize,
}

struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

fn logical_lines(text: &str) -> Vec<Instruction> {
    let mut escape = '\\';
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    let mut directives_allowed = true;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = raw.trim();
        if directives_allowed && current.is_none() {
            if let Some((k, v)) = trimmed.strip_prefix('#').and_then(|d| d.split_once('=')) {
                let k = k.trim();
                if k.eq_ignore_ascii_case("escape") {
                    if let Some(c) = v.trim().chars().next() {
                        escape = c;
                    }
                    continue;
                }
                if k.eq_ignore_ascii_case("syntax") || k.eq_ignore_ascii_case("check") {
                    continue;
                }
            }
            directives_allowed = false;
        }
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (continues, body) = match trimmed.strip_suffix(escape) {
            Some(body) => (true, body),
            None => (false, trimmed),
        };
        match &mut current {
            Some((_, text)) => {
                text.push(' ');
                text.push_str(body);
            }
            None => current = Some((line_no, body.to_owned())),
        }
        if !continues && let Some((line, text)) = current.take() {
            let (keyword, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
            out.push(Instruction {
                line,
                keyword: keyword.to_ascii_uppercase(),
                args: args.trim().to_owned(),
            });
        }
    }
    if let Some((line, text)) = current {
        let (keyword, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
        out.push(Instruction {
            line,
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_owned(),
        });
    }
    out
}

/// `$NAME` and `${NAME}` replaced from `args`; a name without a value is an error.
fn substitute(text: &str, args: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek() == Some(&'{');
        if braced {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphanumeric() || n == '_' {
                name.push(n);
                chars.next();
            } else {
                break;
            }
        }
        if braced {
            // `${NAME:-default}` and friends are not resolved: the pin must be plain.
            if chars.next() != Some('}') {
                return Err(format!(
                    "uses ${{{name}…}}, which Baton does not resolve; write the image reference out"
                ));
            }
        }
        match args.get(&name) {
            Some(v) => out.push_str(v),
            None => {
                return Err(format!(
                    "uses build argument {name}, which has no default before the first FROM; \
                     a base image must be pinned in the Dockerfile itself"
                ));
            }
        }
    }
    Ok(out)
}

/// Checks one external image reference: pinned by a sha256 digest, no `latest`.
pub fn check_reference(reference: &str) -> Result<(), (&'static str, String)> {
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    // A tag is a `:` after the last `/` (a `:` before it is a registry port).
    let last = name.rsplit('/').next().unwrap_or(name);
    if let Some((_, tag)) = last.split_once(':')
        && tag.eq_ignore_ascii_case("latest")
    {
        return Err((
            "latest_tag",
            format!("{reference} uses the tag `latest`; the seed never builds from or ships `latest`"),
        ));
    }
    match digest {
        None => Err((
            "base_not_pinned",
            format!("{reference} is not pinned to a digest; write it as {name}@sha256:<digest>"),
        )),
        Some(d) => {
            let hex = d.strip_prefix("sha256:").unwrap_or("");
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                Ok(())
            } else {
                Err((
                    "base_not_pinned",
                    format!("{reference} has digest {d:?}; expected sha256: and 64 lowercase hex digits"),
                ))
            }
        }
    }
}

/// What an instruction's flags (the `--` words before its arguments) read
/// from: `--from=X` of COPY and ADD, `from=X` of RUN's `--mount=` options.
fn from_references<'a>(keyword: &str, args: &'a str) -> Vec<&'a str> {
    let flags = args.split_whitespace().take_while(|w| w.starts_with("--"));
    let froms: Vec<&str> = match keyword {
        "RUN" => flags
            .filter_map(|w| w.strip_prefix("--mount="))
            .flat_map(|options| options.split(',').filter_map(|o| o.strip_prefix("from=")))
            .collect(),
        _ => flags.filter_map(|w| w.strip_prefix("--from=")).collect(),
    };
    froms.into_iter().map(|f| f.trim_matches('"')).collect()
}

/// Applies the rules to a Dockerfile's text.
pub fn check(text: &str) -> Result<Checked, Refusal> {
    let instructions = logical_lines(text);
    let mut global_args = BTreeMap::new();
    let mut stages: Vec<String> = Vec::new();
    let mut stage_count = 0;
    let mut images = Vec::new();
    let refuse = |line: usize, (rule, problem): (&'static str, String)| Refusal { line, rule, problem };
    for ins in &instructions {
        match ins.keyword.as_str() {
            "ARG" if stage_count == 0 => {
                for word in ins.args.split_whitespace() {
                    if let Some((k, v)) = word.split_once('=') {
                        global_args.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                }
            }
            "FROM" => {
                stage_count += 1;
                let words: Vec<&str> = ins.args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                let Some(image) = words.first() else {
                    return Err(refuse(
                        ins.line,
                        ("invalid_dockerfile", "FROM names no image".to_owned()),
                    ));
                };
                let image = substitute(image, &global_args).map_err(|p| refuse(ins.line, ("base_not_pinned", p)))?;
                match words.get(1..) {
                    Some([as_kw, name]) if as_kw.eq_ignore_ascii_case("as") => stages.push(name.to_ascii_lowercase()),
                    Some([]) | None => stages.push(String::new()),
                    Some(_) => {
                        return Err(refuse(
                            ins.line,
                            (
                                "invalid_dockerfile",
                                format!("FROM {}: expected `FROM <image> [AS <name>]`", ins.args),
                            ),
                        ));
                    }
                }
                let is_stage = stages[..stages.len() - 1].contains(&image.to_ascii_lowercase());
                if image.eq_ignore_ascii_case("scratch") || is_stage {
                    continue;
                }
                check_reference(&image).map_err(|r| refuse(ins.line, r))?;
                images.push(ImageUse {
                    line: ins.line,
                    reference: image,
                });
            }
            // `COPY --from=`, `ADD --from=` and `RUN --mount=…,from=` may name an
            // earlier stage (by name or index) or an image.
            "RUN" | "COPY" | "ADD" if stage_count > 0 => {
                for from in from_references(&ins.keyword, &ins.args) {
                    let is_stage = stages.contains(&from.to_ascii_lowercase())
                        || from.parse::<usize>().is_ok_and(|i| i < stages.len());
                    if !is_stage {
                        check_reference(from).map_err(|r| refuse(ins.line, r))?;
                        images.push(ImageUse {
                            line: ins.line,
                            reference: from.to_owned(),
                        });
                    }
                }
            }
            _ if stage_count == 0 && ins.keyword != "ARG" => {
                return Err(refuse(
                    ins.line,
                    (
                        "invalid_dockerfile",
                        format!("{} before the first FROM (only ARG may come first)", ins.keyword),
                    ),
                ));
            }
            _ => {}
        }
    }
    if stage_count == 0 {
        return Err(Refusal {
            line: 1,
            rule: "invalid_dockerfile",
            problem: "no FROM instruction".to_owned(),
        });
    }
    Ok(Checked {
        images,
        stages: stage_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256:5d6af617a3f8b2a619a0787e2b780500e4a34a7bb8b8201b0bdc1d6cb198ca81";

    #[test]
    fn a_pinned_multi_stage_build_passes() {
        let text = format!(
            "# syntax=docker/dockerfile:1\nARG BASE=localhost/busybox@{PIN}\nFROM --platform=linux/amd64 ${{BASE}} AS build\n\
             RUN make \\\n  all\nFROM registry.example.org:5000/base@{PIN}\nCOPY --from=build /out /app\nCOPY --from=0 /x /y\n"
        );
        let checked = check(&text).unwrap();
        assert_eq!(checked.stages, 2);
        assert_eq!(
            checked.images,
            vec![
                ImageUse {
                    line: 3,
                    reference: format!("localhost/busybox@{PIN}")
                },
                ImageUse {
                    line: 6,
                    reference: format!("registry.example.org:5000/base@{PIN}")
                },
            ]
        );
    }

    #[test]
    fn refusals_name_the_line_and_rule() {
        let cases = [
            ("FROM debian:12\n", 1, "base_not_pinned"),
            (
                &format!("FROM busybox@{PIN} AS a\n\n# c\nFROM busybox:latest@{PIN}\n") as &str,
                4,
                "latest_tag",
            ),
            ("from busybox:LATEST\n", 1, "latest_tag"),
            (
                &format!("FROM busybox@{PIN}\nCOPY --chown=1 --from=alpine:3 /a /b\n"),
                2,
                "base_not_pinned",
            ),
            ("ARG V\nFROM busybox@${V}\n", 2, "base_not_pinned"),
            ("FROM busybox@sha256:abc\n", 1, "base_not_pinned"),
            ("RUN echo\nFROM scratch\n", 1, "invalid_dockerfile"),
            (
                &format!("FROM busybox@{PIN} AS a\nRUN --mount=type=bind,from=gcc:latest,target=/t true\n"),
                2,
                "latest_tag",
            ),
            ("# only a comment\n", 1, "invalid_dockerfile"),
            (&format!("FROM busybox@{PIN} AS a b\n"), 1, "invalid_dockerfile"),
        ];
        for (text, line, rule) in cases {
            let r = check(text).unwrap_err();
            assert_eq!((r.line, r.rule), (line, rule), "{text}: {}", r.problem);
        }
    }

    #[test]
    fn scratch_stage_names_and_the_escape_directive() {
        let text = format!("# escape=`\nFROM scratch AS base\nFROM base\nRUN echo a `\n  b\nFROM busybox@{PIN}\n");
        assert_eq!(check(&text).unwrap().stages, 3);
        // A registry port is not a tag.
        assert!(check_reference(&format!("host:5000/latest@{PIN}")).is_ok());
    }
}
