//! Test modules: a tiny valid Wasm binary per tag, and a hand-written proxy-wasm module (WAT,
//! assembled with the `wat` crate so CI needs no Wasm toolchain; envoy.md "A test module without a
//! Wasm toolchain").

/// Response header set by [`proxy_wasm_test_module`]: the plugin configuration, byte for byte.
pub const CONFIG_HEADER: &str = "x-wasm-plugin-config";
/// Response header set by [`proxy_wasm_test_module_tagged`]: the tag the module was built with.
pub const MODULE_HEADER: &str = "x-wasm-module";

/// A small valid Wasm binary (header + one custom section named `wasm-ecds-test` holding `tag`):
/// different tags give different bytes and checksums.
pub fn wasm_module(tag: &str) -> Vec<u8> {
    let name = b"wasm-ecds-test";
    let mut payload = Vec::new();
    leb128(&mut payload, name.len());
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());

    let mut module = b"\0asm\x01\0\0\0".to_vec();
    module.push(0); // custom section
    leb128(&mut module, payload.len());
    module.extend_from_slice(&payload);
    module
}

fn leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The proxy-wasm test module with tag `test`; see [`proxy_wasm_test_module_tagged`].
pub fn proxy_wasm_test_module() -> Vec<u8> {
    proxy_wasm_test_module_tagged("test")
}

/// A proxy-wasm (ABI 0.2.1) HTTP filter that adds two response headers: [`CONFIG_HEADER`] with its
/// plugin configuration and [`MODULE_HEADER`] with `tag`, so every delivery (code or
/// configuration) is observable with plain HTTP requests through Envoy. It logs
/// `wasm-ecds test module <tag> configured` at info level when configured.
///
/// Envoy may run several plugins with the same code in one VM, so the configuration is kept per
/// root context (`proxy_on_configure`) and HTTP contexts look theirs up through their root
/// (`proxy_on_context_create`), in two 1024-slot tables indexed by context id.
///
/// `tag`: 1 to 200 ASCII letters, digits, `.`, `_` or `-`.
pub fn proxy_wasm_test_module_tagged(tag: &str) -> Vec<u8> {
    assert!(
        !tag.is_empty()
            && tag.len() <= 200
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "tag {tag:?}: use ASCII letters, digits, '.', '_' or '-'"
    );
    let wat = PROXY_WASM_WAT
        .replace("@CONFIG_HEADER@", CONFIG_HEADER)
        .replace("@CONFIG_HEADER_LEN@", &CONFIG_HEADER.len().to_string())
        .replace("@MODULE_HEADER@", MODULE_HEADER)
        .replace("@MODULE_HEADER_LEN@", &MODULE_HEADER.len().to_string())
        .replace("@TAG@", tag)
        .replace("@TAG_LEN@", &tag.len().to_string())
        .replace(
            "@LOG_LEN@",
            &format!("wasm-ecds test module {tag} configured")
                .len()
                .to_string(),
        );
    wat::parse_str(&wat).expect("the proxy-wasm test module assembles")
}

/// Memory layout: 0..8 scratch for host return values; 16.. header names, tag, log line;
/// 1024..9216 root table (root id % 1024 → config ptr, len); 9216..13312 HTTP table
/// (context id % 1024 → root id); heap (bump allocator, never freed) from 16384.
const PROXY_WASM_WAT: &str = r#"
(module
  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes"
    (func $proxy_get_buffer_bytes (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value (param i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 16384))

  (data (i32.const 16) "@CONFIG_HEADER@")
  (data (i32.const 80) "@MODULE_HEADER@")
  (data (i32.const 144) "@TAG@")
  (data (i32.const 400) "wasm-ecds test module @TAG@ configured")

  (func (export "proxy_abi_version_0_2_1"))

  ;; Bump allocator; the host calls it to hand over buffers (e.g. the configuration).
  (func $malloc (export "malloc") (export "proxy_on_memory_allocate")
    (param $size i32) (result i32)
    (local $ptr i32) (local $end i32)
    (local.set $ptr (global.get $heap))
    (local.set $end
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (block $enough
      (loop $grow
        (br_if $enough
          (i32.le_u (local.get $end) (i32.shl (memory.size) (i32.const 16))))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
          (then (return (i32.const 0))))
        (br $grow)))
    (global.set $heap (local.get $end))
    (local.get $ptr))

  (func $root_slot (param $id i32) (result i32)
    (i32.add (i32.const 1024) (i32.shl (i32.and (local.get $id) (i32.const 1023)) (i32.const 3))))
  (func $http_slot (param $id i32) (result i32)
    (i32.add (i32.const 9216) (i32.shl (i32.and (local.get $id) (i32.const 1023)) (i32.const 2))))

  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))

  (func (export "proxy_on_context_create") (param $context i32) (param $root i32)
    (if (i32.ne (local.get $root) (i32.const 0))
      (then (i32.store (call $http_slot (local.get $context)) (local.get $root)))))

  ;; Buffer type 7: the plugin configuration (raw bytes of the StringValue).
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (local $slot i32)
    (local.set $slot (call $root_slot (local.get $root)))
    (i32.store (local.get $slot) (i32.const 0))
    (i32.store offset=4 (local.get $slot) (i32.const 0))
    (if (i32.gt_s (local.get $size) (i32.const 0))
      (then
        (if (i32.eqz (call $proxy_get_buffer_bytes
                       (i32.const 7) (i32.const 0) (local.get $size) (i32.const 0) (i32.const 4)))
          (then
            (i32.store (local.get $slot) (i32.load (i32.const 0)))
            (i32.store offset=4 (local.get $slot) (i32.load (i32.const 4)))))))
    (drop (call $proxy_log (i32.const 2) (i32.const 400) (i32.const @LOG_LEN@)))
    (i32.const 1))

  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))

  ;; Map type 2: response headers. Returns 0 (continue).
  (func (export "proxy_on_response_headers") (param $context i32) (param i32 i32) (result i32)
    (local $slot i32)
    (local.set $slot
      (call $root_slot (i32.load (call $http_slot (local.get $context)))))
    (drop (call $proxy_add_header_map_value
      (i32.const 2) (i32.const 16) (i32.const @CONFIG_HEADER_LEN@)
      (i32.load (local.get $slot)) (i32.load offset=4 (local.get $slot))))
    (drop (call $proxy_add_header_map_value
      (i32.const 2) (i32.const 80) (i32.const @MODULE_HEADER_LEN@)
      (i32.const 144) (i32.const @TAG_LEN@)))
    (i32.const 0))

  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32)))
"#;
