//! The real [`Transport`](super::Transport): hyper with rustls.
// STUB: to be implemented.
