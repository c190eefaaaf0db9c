//! The OCI registry fetcher (behavior.md §4.2).
// STUB: to be implemented.
