//! Small helpers for threads that must survive a panic elsewhere: every lock in the workspace
//! recovers from poisoning the same way, and every caught panic is described the same way.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering the guard if a thread panicked while holding it. Callers keep their
/// updates to single steps (a push, a pop, a flag), so state behind a poisoned lock is never half
/// written, and one panicking batch must not take every later request down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The message a caught panic carried (`panic!("...")` with or without format arguments), or
/// `"unknown panic"` for a payload of another type.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_value() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("holding the lock");
        })
        .join();
        assert!(m.is_poisoned());
        lock(&m).push(2);
        assert_eq!(*lock(&m), vec![1, 2]);
    }

    #[test]
    fn panic_messages_of_every_payload_kind() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        assert_eq!(panic_message(&*caught(|| panic!("plain"))), "plain");
        assert_eq!(panic_message(&*caught(|| panic!("formatted {}", 7))), "formatted 7");
        assert_eq!(panic_message(&*caught(|| std::panic::panic_any(42u8))), "unknown panic");
    }
}
