//! Every Millrace format, and the Prio3 and key handling behind them.
//!
//! No service parses bytes by hand: objects in storage ([`formats`]), task messages ([`tasks`]),
//! result documents ([`results`]), client uploads and HPKE configs ([`upload`]), object keys
//! ([`layout`]) and the aggregations file ([`config`]) all live here, each with a version and a strict decoder.

pub mod agreement;
mod codec;
pub mod config;
pub mod crypto;
pub mod dp;
pub mod error;
pub mod formats;
pub mod layout;
pub mod parties;
pub mod results;
pub mod tasks;
pub mod upload;
pub mod vdaf;

pub use error::{FormatError, ObjectError};
