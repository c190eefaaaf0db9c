//! Unpacking module bodies (behavior.md §4.1, §4.2): plain Wasm, gzip, tar (first entry), tar.gz,
//! and `plugin.wasm` out of image layers; bounded by the size limit (no decompression bombs).
// STUB: to be implemented.
