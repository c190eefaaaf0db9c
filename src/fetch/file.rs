//! `file://` modules.
// STUB: to be implemented.
