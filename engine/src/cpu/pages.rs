//! Large buffers on transparent huge pages.
//!
//! A GEMM walks its packed weights, packed inputs and outputs in blocks spread over tens of
//! megabytes: with 4 KiB pages that is thousands of pages per multiplication, more than the
//! TLB holds. On a Zen 3 core a 2048 x 1024 x 1024 GEMM ran about 5% faster on 2 MiB pages, and
//! bench-small's forward about 1% (docs/bench-cpu.md). Most Linux systems give huge pages only
//! to memory that asks for them (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`), so
//! the buffers ask. Elsewhere, or where the system refuses, they are ordinary memory: the advice
//! never changes contents.

/// Huge page size on x86-64 and most aarch64 Linux systems.
const HUGE: usize = 2 << 20;

/// Buffers smaller than this stay on ordinary pages: a huge page would mostly hold nothing.
const MIN_BYTES: usize = 4 * HUGE;

/// An empty vector with room for `len` elements, on huge pages where the system grants them.
fn with_capacity<T>(len: usize) -> Vec<T> {
    let v = Vec::with_capacity(len);
    // Before the first touch: a page is chosen when it first faults.
    advise(v.as_ptr() as usize, len * std::mem::size_of::<T>());
    v
}

/// A vector of `len` default (zero) values, asking for huge pages before its memory is first
/// touched. For zero values `vec!` allocates with `calloc`, whose large blocks are fresh pages
/// that nothing writes until they are used: filling them here would be one more serial pass
/// over every weight at load.
pub fn zeroed<T: Clone + Default>(len: usize) -> Vec<T> {
    let v = vec![T::default(); len];
    advise(v.as_ptr() as usize, len * std::mem::size_of::<T>());
    v
}

/// `Vec::resize`, except that growing past the capacity moves `v` to memory that asked for huge
/// pages.
pub fn resize<T: Clone>(v: &mut Vec<T>, len: usize, value: T) {
    if v.capacity() < len {
        let mut grown = with_capacity(len);
        grown.extend_from_slice(v);
        *v = grown;
    }
    v.resize(len, value);
}

/// Asks the kernel to back the whole 2 MiB pages inside `[addr, addr + bytes)` with huge pages.
fn advise(addr: usize, bytes: usize) {
    if bytes < MIN_BYTES {
        return;
    }
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + bytes) / HUGE * HUGE;
    if end <= start {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: the range lies inside one live allocation of the caller's; MADV_HUGEPAGE is advice
    // about how to back it and never changes what it holds. A refusal (THP disabled, an old
    // kernel) leaves ordinary pages, which is what the error would tell us.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_hold_what_was_asked_whatever_their_pages() {
        let len = MIN_BYTES / 4 + 12345;
        let v = zeroed::<f32>(len);
        assert_eq!(v.len(), len);
        assert!(v.iter().all(|&x| x == 0.0));
        let mut w = vec![2.0f32; 10];
        resize(&mut w, len, 3.0);
        assert_eq!((w.len(), w[9], w[10], w[len - 1]), (len, 2.0, 3.0, 3.0));
        resize(&mut w, 5, 0.0);
        assert_eq!(w, vec![2.0; 5]);
    }
}
