//! `${VAR}` in the manifest's string values, from clusterd's environment, before the schema is
//! checked (so an interpolated value is validated like a written one).
//!
//! The rule is docker-compose's, for the braced forms:
//! - `${VAR}`: the variable's value; unset is a problem reported at the string.
//! - `${VAR:-default}`: the default when the variable is unset **or empty**.
//! - `${VAR-default}`: the default only when it is unset.
//! - `$$`: a literal `$`.
//!
//! A `$` followed by anything else is kept as written, so shell snippets in commands
//! (`echo $!`, `$HOME`) mean what they say. Table keys are never interpolated.

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use crate::doc::KeyPath;
use crate::error::Problem;

/// Interpolates every string value below `table` (at `key`) in place; returns the problems.
pub(crate) fn table(
    table: &mut DeTable<'_>,
    key: &KeyPath,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) {
    for (name, value) in table.iter_mut() {
        let key = key.child(name.get_ref());
        self::value(value, &key, text, lookup, problems);
    }
}

fn value(
    value: &mut Spanned<DeValue<'_>>,
    key: &KeyPath,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) {
    let start = value.span().start;
    match value.get_mut() {
        DeValue::String(s) if s.contains('$') => match expand(s, lookup) {
            Ok(expanded) => *s = DeString::Owned(expanded),
            Err(message) => problems.push(Problem::at(text, start, key.to_string(), message)),
        },
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let key = key.child(&i.to_string());
                self::value(item, &key, text, lookup, problems);
            }
        }
        DeValue::Table(inner) => self::table(inner, key, text, lookup, problems),
        _ => {}
    }
}

/// `s` with its `${...}` and `$$` replaced.
pub(crate) fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(braced) = rest.strip_prefix("${") {
            let Some(end) = braced.find('}') else {
                return Err(format!(
                    "unterminated \"${{\" in {s:?} (write $$ for a literal $)"
                ));
            };
            out.push_str(&substitute(&braced[..end], lookup)?);
            rest = &braced[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of one `${...}` body: `VAR`, `VAR:-default` or `VAR-default`.
fn substitute(body: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default, empty_too) = match body.find([':', '-']) {
        Some(i) if body[i..].starts_with(":-") => (&body[..i], Some(&body[i + 2..]), true),
        Some(i) if body[i..].starts_with('-') => (&body[..i], Some(&body[i + 1..]), false),
        Some(_) => {
            return Err(format!(
                "unsupported \"${{{body}}}\": use ${{VAR}}, ${{VAR:-default}} or ${{VAR-default}}"
            ));
        }
        None => (body, None, false),
    };
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(format!("\"${{{body}}}\": {name:?} is not a variable name"));
    }
    match (lookup(name), default) {
        (Some(value), Some(default)) if value.is_empty() && empty_too => Ok(default.to_owned()),
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_owned()),
        (None, None) => Err(format!(
            "${{{name}}} is not set in clusterd's environment (give a default: ${{{name}:-value}})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "REDIS" => Some("10.0.0.1:7000".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn braced_forms_and_literal_dollars() {
        let x = |s: &str| expand(s, &env);
        assert_eq!(x("${REDIS}").unwrap(), "10.0.0.1:7000");
        assert_eq!(x("a=${REDIS:-x},b").unwrap(), "a=10.0.0.1:7000,b");
        assert_eq!(x("${NOPE:-127.0.0.1:7000}").unwrap(), "127.0.0.1:7000");
        assert_eq!(x("${EMPTY:-d}").unwrap(), "d");
        assert_eq!(x("${EMPTY-d}").unwrap(), "");
        assert_eq!(x("${NOPE-d}").unwrap(), "d");
        assert_eq!(x("cost $$5 and ${NOPE:-}").unwrap(), "cost $5 and ");
        // Shell snippets keep their meaning.
        assert_eq!(x("echo $! $HOME $").unwrap(), "echo $! $HOME $");
    }

    #[test]
    fn problems_say_what_to_write() {
        let x = |s: &str| expand(s, &env).unwrap_err();
        assert!(x("${NOPE}").contains("not set"));
        assert!(x("${REDIS").contains("unterminated"));
        assert!(x("${9X}").contains("not a variable name"));
        assert!(x("${A:?err}").contains("unsupported"));
    }
}
