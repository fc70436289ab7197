//! The JSON-RPC API: the method table ([`api`]) and what each method does ([`handlers`], [`console`]),
//! the params and result types ([`params`], [`results`]) and the OpenRPC document derived
//! from them ([`schema`]), error codes ([`errors`]), transport limits ([`limits`]) and the
//! line-delimited transport itself ([`transport`], over `framing`).

pub mod api;
pub mod bytes;
pub mod console;
pub mod errors;
pub mod exec;
mod framing;
pub mod handlers;
pub mod limits;
pub mod params;
pub mod results;
pub mod schema;
pub mod transport;

use jsonrpsee::Methods;
use jsonrpsee::core::RegisterMethodError;

pub use limits::Limits;
pub use transport::{Peer, serve};

/// Every method the API serves, backed by `manager`.
pub fn methods(manager: crate::vm::Manager) -> Result<Methods, RegisterMethodError> {
    Ok(api::rpc_module(manager)?.into())
}
