//! Configuration resources: their schema, parsing, and the watched config
//! directory of the `local` store.

pub mod dir;
pub mod parse;
pub mod types;

pub use dir::ConfigDir;
pub use parse::ConfigError;
pub use types::Resource;
