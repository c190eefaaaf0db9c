//! The HTTP(S) fetcher (behavior.md §4.1).
// STUB: to be implemented.
