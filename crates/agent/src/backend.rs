//! The isolation backends the agent runs instances with, behind one interface
//! (`juice_runtime::{Backend, Handle}`): `sandbox` is `juice_sandbox::Runtime`,
//! `microvm` is `juice_microvm::Runtime`; the reconciler never knows which one
//! an instance runs under.

pub use juice_runtime::{Backend, BackendError, Handle};

/// An in-memory backend for tests and the fleet's hollow hosts.
#[cfg(any(test, feature = "fake"))]
pub mod fake;
