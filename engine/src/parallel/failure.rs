//! The first failure of a group of ranks: once set it poisons the tensor-parallel groups, tells
//! the leader (on a worker node) and answers every later call.

use std::sync::{Arc, Mutex};

use crate::parallel::local::LocalGroup;
use crate::sync::lock;

/// Told once about the first failure (a worker forwards it to the leader).
pub(crate) type Notify = Box<dyn Fn(&str) + Send>;

/// The first failure of a group, shared by its ranks, its node link and its engine.
#[derive(Default)]
pub(crate) struct Failure {
    first: Mutex<Option<String>>,
    groups: Mutex<Vec<Arc<LocalGroup>>>,
    notify: Mutex<Option<Notify>>,
}

impl Failure {
    /// The first failure, if any.
    pub(crate) fn get(&self) -> Option<String> {
        lock(&self.first).clone()
    }

    /// Records `why` unless a failure came first, poisons the groups, and returns the failure
    /// that stands (the first one).
    pub(crate) fn set(&self, why: String) -> String {
        let (why, first) = {
            let mut f = lock(&self.first);
            let first = f.is_none();
            (f.get_or_insert(why).clone(), first)
        };
        for g in lock(&self.groups).iter() {
            g.poison(&why);
        }
        if first {
            if let Some(notify) = lock(&self.notify).take() {
                notify(&why);
            }
        }
        why
    }

    /// The groups to poison on failure.
    pub(crate) fn watch(&self, groups: Vec<Arc<LocalGroup>>) {
        *lock(&self.groups) = groups;
    }

    /// Who to tell about the first failure.
    pub(crate) fn on_failure(&self, notify: Notify) {
        *lock(&self.notify) = Some(notify);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_first_failure_stands_poisons_the_groups_and_is_told_once() {
        let f = Failure::default();
        let group = LocalGroup::new(2, Duration::from_secs(60));
        f.watch(vec![group.clone()]);
        let told = Arc::new(Mutex::new(Vec::<String>::new()));
        let t = told.clone();
        f.on_failure(Box::new(move |why| lock(&t).push(why.to_string())));
        assert_eq!(f.get(), None);
        assert_eq!(f.set("rank 1 died".into()), "rank 1 died");
        assert_eq!(f.set("later".into()), "rank 1 died");
        assert_eq!(f.get().as_deref(), Some("rank 1 died"));
        assert_eq!(*lock(&told), vec!["rank 1 died".to_string()]);
        // A poisoned group fails at once instead of waiting for its peer.
        let comm = group.communicators().pop().unwrap();
        let mut t = crate::cpu::CpuTensor::new(vec![1.0], 1, 1);
        let e = crate::backend::Communicator::all_reduce(&comm, &mut t).unwrap_err().to_string();
        assert!(e.contains("rank 1 died"), "{e}");
    }
}
