//! SQL both warehouses build from: quoted identifiers (a load's column list is
//! [`crate::entity::Entity::table_columns`]).

/// Quotes an SQL identifier (every identifier sluice builds into SQL is also validated).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
