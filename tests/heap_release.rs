//! The controller hands the allocator's free memory back once the initial plugin set is loaded
//! (`wasm_ecds::serve::release_freed_memory`), so that the first edits after start-up do not pay
//! for merging what loading freed. This looks at glibc's arenas through `malloc_info`, so it runs
//! in a process of its own: another test's allocations would merge the blocks it counts.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

/// The small freed blocks the allocator keeps aside, unmerged, in all its arenas (from
/// `malloc_info`'s summary line `<total type="fast" count="N" …/>`): the next allocation of 1 KiB
/// or more in their arena merges and sorts them all first.
fn deferred_blocks() -> usize {
    let text = malloc_info();
    let head = "<total type=\"fast\" count=\"";
    let count = &text[text.rfind(head).expect("a summary line") + head.len()..];
    count[..count.find('"').expect("a closing quote")]
        .parse()
        .expect("a count")
}

fn malloc_info() -> String {
    let mut text = vec![0u8; 1 << 20];
    // SAFETY: fmemopen writes at most `text.len()` bytes into `text`, which outlives the stream
    // (closed before `text` is read).
    let written = unsafe {
        let f = libc::fmemopen(text.as_mut_ptr().cast(), text.len(), c"w".as_ptr());
        assert!(!f.is_null(), "fmemopen");
        libc::malloc_info(0, f);
        let n = libc::ftell(f);
        libc::fclose(f);
        n
    };
    String::from_utf8_lossy(&text[..written.max(0) as usize]).into_owned()
}

/// What loading leaves behind — many small blocks freed among live ones — is merged when the
/// memory is released, not by whichever allocation comes next (the first edit's). The blocks are
/// freed on a thread of their own (its own arena: reading the allocator's state allocates, which
/// merges the reader's arena).
#[test]
fn freed_blocks_left_aside_are_merged_when_released() {
    let (freed_tx, freed) = std::sync::mpsc::channel();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let blocks: Vec<Box<[u8; 40]>> = (0..100_000).map(|_| Box::new([1; 40])).collect();
        // Every other one freed: live neighbours, as in a heap after start-up.
        let kept: Vec<_> = blocks.into_iter().step_by(2).collect();
        freed_tx.send(()).expect("test waiting");
        let _ = done_rx.recv();
        drop(kept);
    });
    freed.recv().expect("blocks freed");
    let before = deferred_blocks();
    wasm_ecds::serve::release_freed_memory();
    let after = deferred_blocks();
    done.send(()).expect("thread waiting");
    thread.join().expect("thread");
    assert!(before >= 40_000, "{before} blocks aside: {}", malloc_info());
    assert!(after < before / 10, "{before} blocks aside, {after} after");
}
