//! The YAML toolkit shared by the loader configuration ([`crate::config`]) and the Istio
//! objects of an apply ([`crate::istio`]).
//!
//! - [`read`]: bounded reads and UTF-8 errors with the line;
//! - [`documents`]: splitting a stream into documents, checks before parsing, line shifting;
//! - [`location`]: field paths and finding the line and column of a field;
//! - [`scalars`]: the one weight, the one port and the listen address;
//! - [`error`]: the one error type, [`Error`], with the location.

pub mod documents;
pub mod error;
pub mod location;
pub mod read;
pub mod scalars;

pub use error::{Error, Located, clip, seg};
pub use location::{FieldPath, Seg, locate, path};
pub use read::{MAX_FILE_BYTES, read_file_limited, read_limited, read_text, utf8};
pub use scalars::{Port, Weight};
