//! Tenant slugs: the only tenant identifier that reaches a file name or a SQL identifier, so
//! it is validated once, here, and carried as a type afterwards.

use std::fmt;

use crate::error::{EngineError, ErrorKind, Result};

/// A validated tenant slug: `[a-z][a-z0-9_]{1,39}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantSlug(String);

impl TenantSlug {
    /// Validates `slug`.
    pub fn parse(slug: &str) -> Result<Self> {
        let b = slug.as_bytes();
        let ok = (2..=40).contains(&b.len())
            && b[0].is_ascii_lowercase()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
        if ok {
            Ok(TenantSlug(slug.to_string()))
        } else {
            Err(EngineError::new(
                ErrorKind::Config,
                format!(
                    "invalid tenant slug {slug:?}: use 2-40 characters, a lower-case letter first, then lower-case letters, digits or '_'"
                ),
            ))
        }
    }

    /// The slug.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_that_could_escape_a_path_or_identifier_are_rejected() {
        assert!(TenantSlug::parse("acme").is_ok());
        assert!(TenantSlug::parse("acme_2").is_ok());
        for bad in [
            "", "a", "Acme", "1acme", "ac me", "acme\"", "../x", "a;drop", "acme-x",
        ] {
            assert!(TenantSlug::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
