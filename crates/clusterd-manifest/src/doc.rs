//! Walking the spanned TOML document: dotted key paths, tables checked against their allowed
//! keys, fields fetched and converted, and the [`Checker`] that collects a [`Problem`] for
//! everything wrong instead of stopping at the first.

use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::Problem;

/// A value of the document with its byte span.
pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// A dotted key such as `apps.web.workers`; segments that are not bare TOML keys are quoted.
#[derive(Debug, Clone)]
pub(crate) struct KeyPath(String);

impl KeyPath {
    /// The document itself.
    pub(crate) fn root() -> Self {
        KeyPath(String::new())
    }

    /// The key `segment` inside this one.
    pub(crate) fn child(&self, segment: &str) -> Self {
        let bare = !segment.is_empty()
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let segment = if bare {
            segment.to_owned()
        } else {
            format!("{segment:?}")
        };
        if self.0.is_empty() {
            KeyPath(segment)
        } else {
            KeyPath(format!("{}.{segment}", self.0))
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a value was rejected.
pub(crate) enum Bad {
    /// Reported as `expected {0}, found {the value}`.
    Expected(String),
    /// Reported as is.
    Message(String),
}

impl Bad {
    /// `expected {what}, found {the value}`.
    pub(crate) fn expected(what: impl Into<String>) -> Self {
        Bad::Expected(what.into())
    }
}

/// The outcome of reading an optional field.
pub(crate) enum Field<T> {
    /// The key is not there.
    Absent,
    /// The key is there and its problem was reported.
    Invalid,
    /// The key is there and valid.
    Valid(T),
}

impl<T> Field<T> {
    /// The value, or `default` when absent; `None` when invalid.
    pub(crate) fn or(self, default: T) -> Option<T> {
        match self {
            Field::Absent => Some(default),
            Field::Invalid => None,
            Field::Valid(value) => Some(value),
        }
    }

    /// `Some(Some(value))`, `Some(None)` when absent, `None` when invalid.
    pub(crate) fn optional(self) -> Option<Option<T>> {
        match self {
            Field::Absent => Some(None),
            Field::Invalid => None,
            Field::Valid(value) => Some(Some(value)),
        }
    }
}

/// A table of the document: its key, its span (the header for `[a.b]` tables) and entries.
pub(crate) struct Table<'a, 'i> {
    pub(crate) key: KeyPath,
    pub(crate) span: Range<usize>,
    pub(crate) entries: &'a DeTable<'i>,
}

impl<'a, 'i> Table<'a, 'i> {
    /// The value under `name`, if present.
    pub(crate) fn get(&self, name: &str) -> Option<&'a Value<'i>> {
        self.entries.get(name)
    }

    /// Every entry: key (with its span) and value.
    pub(crate) fn iter(
        &self,
    ) -> impl Iterator<Item = (&'a Spanned<toml::de::DeString<'i>>, &'a Value<'i>)> {
        self.entries.iter()
    }
}

/// Collects problems while the document is walked.
pub(crate) struct Checker<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

impl<'t> Checker<'t> {
    /// A checker for the document `text`.
    pub(crate) fn new(text: &'t str) -> Self {
        Checker {
            text,
            problems: Vec::new(),
        }
    }

    /// Whether any problem was reported.
    pub(crate) fn has_problems(&self) -> bool {
        !self.problems.is_empty()
    }

    /// The problems reported, sorted by position.
    pub(crate) fn into_problems(mut self) -> Vec<Problem> {
        self.problems.sort_by_key(|p| (p.line, p.column));
        self.problems
    }

    /// Reports `message` about `key` at the start of `span`.
    pub(crate) fn report(&mut self, span: Range<usize>, key: &KeyPath, message: impl Into<String>) {
        self.problems.push(Problem::at(
            self.text,
            span.start,
            key.to_string(),
            message.into(),
        ));
    }

    /// Reports why `value` (under `key`) was rejected.
    pub(crate) fn reject(&mut self, value: &Value<'_>, key: &KeyPath, bad: Bad) {
        let message = match bad {
            Bad::Expected(what) => format!("expected {what}, found {}", self.describe(value)),
            Bad::Message(message) => message,
        };
        self.report(value.span(), key, message);
    }

    /// `value` as a table under `key` whose keys must all be in `allowed`; reports a value of
    /// another type and every unknown key.
    pub(crate) fn table<'a, 'i>(
        &mut self,
        value: &'a Value<'i>,
        key: KeyPath,
        allowed: &[&str],
    ) -> Option<Table<'a, 'i>> {
        let table = self.map(value, key)?;
        self.check_keys(&table, allowed);
        Some(table)
    }

    /// `value` as a table under `key` whose keys are names chosen by the user (sockets, apps,
    /// environment variables); reports a value of another type.
    pub(crate) fn map<'a, 'i>(
        &mut self,
        value: &'a Value<'i>,
        key: KeyPath,
    ) -> Option<Table<'a, 'i>> {
        let DeValue::Table(entries) = value.get_ref() else {
            self.reject(value, &key, Bad::expected("a table"));
            return None;
        };
        Some(Table {
            key,
            span: value.span(),
            entries,
        })
    }

    /// Reports every key of `table` that is not in `allowed`, listing the allowed ones.
    pub(crate) fn check_keys(&mut self, table: &Table<'_, '_>, allowed: &[&str]) {
        for (name, _) in table.iter() {
            if !allowed.contains(&name.get_ref().as_ref()) {
                let message = format!(
                    "unknown key {:?}, expected one of: {}",
                    name.get_ref(),
                    allowed.join(", ")
                );
                self.report(name.span(), &table.key.child(name.get_ref()), message);
            }
        }
    }

    /// Reads the optional field `name` of `table` through `convert`.
    pub(crate) fn field<'a, 'i, T>(
        &mut self,
        table: &Table<'a, 'i>,
        name: &str,
        convert: impl FnOnce(&'a Value<'i>) -> Result<T, Bad>,
    ) -> Field<T> {
        let Some(value) = table.get(name) else {
            return Field::Absent;
        };
        match convert(value) {
            Ok(converted) => Field::Valid(converted),
            Err(bad) => {
                self.reject(value, &table.key.child(name), bad);
                Field::Invalid
            }
        }
    }

    /// Reads the required field `name` of `table`; a missing one is reported at the table.
    pub(crate) fn required<'a, 'i, T>(
        &mut self,
        table: &Table<'a, 'i>,
        name: &str,
        what: &str,
        convert: impl FnOnce(&'a Value<'i>) -> Result<T, Bad>,
    ) -> Option<T> {
        match self.field(table, name, convert) {
            Field::Absent => {
                let message = format!("missing required key {name:?} ({what})");
                self.report(table.span.clone(), &table.key.child(name), message);
                None
            }
            Field::Invalid => None,
            Field::Valid(value) => Some(value),
        }
    }

    /// How a value is shown after "found": strings quoted, scalars as written, arrays and
    /// tables by kind.
    pub(crate) fn describe(&self, value: &Value<'_>) -> String {
        match value.get_ref() {
            DeValue::String(s) => {
                const LIMIT: usize = 60;
                if s.chars().count() > LIMIT {
                    let head: String = s.chars().take(LIMIT).collect();
                    format!("{head:?}...")
                } else {
                    format!("{s:?}")
                }
            }
            DeValue::Array(items) if items.is_empty() => "an empty array".to_owned(),
            DeValue::Array(_) => "an array".to_owned(),
            DeValue::Table(_) => "a table".to_owned(),
            other => self
                .text
                .get(value.span())
                .filter(|written| !written.is_empty() && !written.contains('\n'))
                .map_or_else(|| format!("a {}", other.type_str()), str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_quote_what_is_not_bare() {
        let apps = KeyPath::root().child("apps");
        assert_eq!(
            apps.child("web").child("workers").to_string(),
            "apps.web.workers"
        );
        assert_eq!(apps.child("my.app").to_string(), "apps.\"my.app\"");
        assert_eq!(apps.child("").to_string(), "apps.\"\"");
    }

    #[test]
    fn values_are_described_as_written() {
        let text = "a = -3\nb = 0x1F\nc = \"four\"\nd = []\ne = [1]\nf = {}\ng = 1.5\nh = true\n";
        let doc = DeTable::parse(text).unwrap();
        let cx = Checker::new(text);
        let found = |k: &str| cx.describe(doc.get_ref().get(k).unwrap());
        assert_eq!(found("a"), "-3");
        assert_eq!(found("b"), "0x1F");
        assert_eq!(found("c"), "\"four\"");
        assert_eq!(found("d"), "an empty array");
        assert_eq!(found("e"), "an array");
        assert_eq!(found("f"), "a table");
        assert_eq!(found("g"), "1.5");
        assert_eq!(found("h"), "true");
    }
}
