//! The controller hands the allocator's free memory back once the initial plugin set is loaded
//! (`wasm_ecds::serve::release_freed_memory`), so that the first edits after start-up do not pay
//! for merging what loading freed. This looks at glibc's arenas through `malloc_info`, so it runs
//! in a process of its own: another test's allocations would merge the blocks it counts. The
//! binary allocates with mimalloc, which keeps freed pages for a while: released, they go back to
//! the system at once (its test allocates through mimalloc directly: this process allocates with
//! glibc). The two tests take turns (releasing merges the other's blocks).
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::sync::Mutex;

/// Held by each test for its whole run.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

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
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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

/// This process's resident memory in bytes (`/proc/self/statm`).
fn resident() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = (statm.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    // SAFETY: sysconf only reads a system constant.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

/// With the binary's allocator options, 64 MiB allocated through mimalloc and freed stay with the
/// allocator (for `ALLOCATOR_PURGE_DELAY_MS`, far longer than this test runs); released, they are
/// back with the system.
#[test]
fn pages_mimalloc_keeps_after_a_free_go_back_when_released() {
    use std::alloc::{GlobalAlloc, Layout};
    const MIB: usize = 1 << 20;
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    wasm_ecds::serve::configure_allocator();
    let mi = mimalloc::MiMalloc;
    let layout = Layout::from_size_align(16 << 10, 8).expect("layout");
    let mut blocks = Vec::with_capacity(64 * MIB / layout.size());
    let base = resident();
    for _ in 0..blocks.capacity() {
        // SAFETY: a non-zero size; the block is written within its size and freed once below.
        unsafe {
            let p = mi.alloc(layout);
            assert!(!p.is_null(), "out of memory");
            p.write_bytes(1, layout.size());
            blocks.push(p);
        }
    }
    let peak = resident();
    for p in blocks {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { mi.dealloc(p, layout) };
    }
    let freed = resident();
    wasm_ecds::serve::release_freed_memory();
    let released = resident();
    let mib = |b: usize| b / MIB;
    let report = format!(
        "resident: {} MiB before, {} allocated, {} freed, {} released",
        mib(base),
        mib(peak),
        mib(freed),
        mib(released)
    );
    assert!(peak >= base + 60 * MIB, "{report}");
    assert!(released + 48 * MIB <= peak, "{report}");
    eprintln!("{report}");
}
