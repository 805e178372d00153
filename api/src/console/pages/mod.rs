//! One file per page family.

pub mod admin;
pub mod dead_letters;
pub mod finance;
pub mod overview;
pub mod quarantine;
pub mod runs;
pub mod sign_in;
pub mod upload;
pub mod webhooks;
