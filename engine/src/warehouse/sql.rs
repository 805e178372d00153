//! SQL both warehouses build from: quoted identifiers and the column list of a load.

use crate::entity::Entity;

/// Quotes an SQL identifier (every identifier sluice builds into SQL is also validated).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Columns a load writes, in order (see [`Entity::table_columns`]).
pub(crate) fn load_columns(entity: Entity) -> Vec<&'static str> {
    entity.table_columns()
}
