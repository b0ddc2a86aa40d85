//! Activation buffers reused across ops and forwards.
//!
//! A fresh multi-megabyte `Vec` comes from the kernel as untouched pages: the first write to each
//! 4 KiB page faults and the kernel zeroes it, which made the element-wise ops (relu², the norms)
//! several times slower than their arithmetic. Buffers dropped by one op are handed to the next of
//! a similar size instead, without being zeroed: every op writes all of its output.
//!
//! The pool keeps what the largest forward so far dropped, at most [`KEEP`] buffers: memory that
//! forward held at its peak anyway, and that the memory plan (engine/src/memory.rs) counts.

use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// Buffers kept for reuse: more than a forward holds alive at once (the residual stream, a norm
/// output, q/k/v, the attention output, the MLP's two widths).
const KEEP: usize = 8;

/// Recently dropped tensor buffers of one backend.
#[derive(Default)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<f32>>>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufferPool({} free)", lock(&self.free).len())
    }
}

impl BufferPool {
    /// A new, shared pool.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A buffer of `len` values whose contents are unspecified (stale values of an earlier
    /// tensor, or zeros): the caller writes every element.
    pub fn take(&self, len: usize) -> Vec<f32> {
        let reused = {
            let mut free = lock(&self.free);
            // The smallest buffer that holds `len` values, so large ones stay for large tensors.
            let best = (0..free.len()).filter(|&i| free[i].capacity() >= len).min_by_key(|&i| free[i].capacity());
            best.map(|i| free.swap_remove(i))
        };
        match reused {
            Some(mut buf) => {
                if buf.len() >= len {
                    buf.truncate(len);
                } else {
                    buf.resize(len, 0.0);
                }
                buf
            }
            None => super::pages::zeroed(len),
        }
    }

    /// Keeps `buf` for a later [`BufferPool::take`]; past [`KEEP`] buffers the smallest goes.
    pub fn give(&self, buf: Vec<f32>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut free = lock(&self.free);
        free.push(buf);
        if free.len() > KEEP {
            let smallest = (0..free.len()).min_by_key(|&i| free[i].capacity()).unwrap_or(0);
            free.swap_remove(smallest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_by_the_best_fitting_request() {
        let pool = BufferPool::default();
        let big = vec![1.0f32; 1000];
        let small = vec![2.0f32; 100];
        let (big_ptr, small_ptr) = (big.as_ptr(), small.as_ptr());
        pool.give(big);
        pool.give(small);
        let a = pool.take(50);
        assert_eq!((a.as_ptr(), a.len()), (small_ptr, 50));
        let b = pool.take(1000);
        assert_eq!((b.as_ptr(), b.len()), (big_ptr, 1000));
        // Nothing left that fits: a fresh, zeroed buffer.
        let c = pool.take(10);
        assert!(c.iter().all(|&v| v == 0.0) && c.len() == 10);
        // A reused buffer grown past its old length is zero-filled there.
        pool.give(a);
        let d = pool.take(80);
        assert_eq!(d.as_ptr(), small_ptr);
        assert!(d[50..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn keeps_at_most_a_few_buffers_dropping_the_smallest() {
        let pool = BufferPool::default();
        for n in 1..=KEEP + 3 {
            pool.give(vec![0.0; n * 10]);
        }
        let free = lock(&pool.free);
        assert_eq!(free.len(), KEEP);
        assert_eq!(free.iter().map(Vec::capacity).min(), Some(40));
    }
}
