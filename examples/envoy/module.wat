;; A proxy-wasm (ABI 0.2.1) HTTP filter written by hand, so no Wasm toolchain is needed: it adds
;; two response headers, `x-wasm-plugin-config` (its plugin configuration, byte for byte) and
;; `x-wasm-module` (the tag `example`), and logs "wasm-ecds test module example configured".
;;
;; This is the module of the integration tests (`proxy_wasm_test_module_tagged("example")` in
;; tests/support/wasm.rs) with its placeholders filled in; tests/envoy_e2e.rs checks that both
;; assemble to the same bytes. Assemble it with
;; `cargo run --manifest-path examples/envoy/wat2wasm/Cargo.toml -- module.wat out.wasm`.
;;
;; Memory layout: 0..8 scratch for host return values; 16.. header names, tag, log line;
;; 1024..9216 root table (root id % 1024 -> config ptr, len); 9216..13312 HTTP table
;; (context id % 1024 -> root id); heap (bump allocator, never freed) from 16384.
(module
  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes"
    (func $proxy_get_buffer_bytes (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value (param i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 16384))

  (data (i32.const 16) "x-wasm-plugin-config")
  (data (i32.const 80) "x-wasm-module")
  (data (i32.const 144) "example")
  (data (i32.const 400) "wasm-ecds test module example configured")

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
    (drop (call $proxy_log (i32.const 2) (i32.const 400) (i32.const 40)))
    (i32.const 1))

  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))

  ;; Map type 2: response headers. Returns 0 (continue).
  (func (export "proxy_on_response_headers") (param $context i32) (param i32 i32) (result i32)
    (local $slot i32)
    (local.set $slot
      (call $root_slot (i32.load (call $http_slot (local.get $context)))))
    (drop (call $proxy_add_header_map_value
      (i32.const 2) (i32.const 16) (i32.const 20)
      (i32.load (local.get $slot)) (i32.load offset=4 (local.get $slot))))
    (drop (call $proxy_add_header_map_value
      (i32.const 2) (i32.const 80) (i32.const 13)
      (i32.const 144) (i32.const 7)))
    (i32.const 0))

  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32)))
