//! [`Latest`]: the slot of a running component (the gossip node, the encryption tunnel) that
//! must end up holding the settings given last (the cluster keys, the members), however its
//! start and a change of the settings interleave.
//!
//! The settings are stored elsewhere (the plane's `keys` and `members`) and read by the
//! closure that gives them to the component. Every such read happens under the slot's lock,
//! on publish as on each change, so the last closure to run read the newest settings.
//!
//! Before, a starting plane published the gossip node, read the keys and gave them to it,
//! while a key change stored its keys, then gave them to the published node: each side was
//! ordered, but the two writes were not, and the start could write the (empty) keys it had
//! read after the change wrote the new ones. The node was left without a key: it could seal
//! nothing, so it never joined again and the others took it for dead, until the next key
//! rotation. `cargo xtask soak --seed 5` hit it once in seven runs, on a restarted worker
//! whose tables were then dropped 15 s later (every VIP on it without backends).

use std::sync::{Mutex, MutexGuard};

/// A component, once published, given its settings under one lock (see the module docs).
pub(crate) struct Latest<T>(Mutex<Option<T>>);

impl<T> Default for Latest<T> {
    fn default() -> Self {
        Latest(Mutex::new(None))
    }
}

impl<T> Latest<T> {
    fn slot(&self) -> MutexGuard<'_, Option<T>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `t` after `give` gave it the current settings (read inside `give`).
    pub(crate) fn publish(&self, t: T, give: impl FnOnce(&T)) {
        let mut slot = self.slot();
        give(&t);
        *slot = Some(t);
    }

    /// After new settings were stored: `give` reads and gives them to the published
    /// component, if there is one.
    pub(crate) fn update(&self, give: impl FnOnce(&T)) {
        if let Some(t) = self.slot().as_ref() {
            give(t);
        }
    }

    /// Takes the component out (it gets no further settings).
    pub(crate) fn take(&self) -> Option<T> {
        self.slot().take()
    }
}

impl<T: Clone> Latest<T> {
    /// A clone of the published component.
    pub(crate) fn get(&self) -> Option<T> {
        self.slot().clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use super::*;

    /// A component that remembers the settings it was given last.
    #[derive(Clone, Default)]
    struct Component(Arc<AtomicU32>);

    /// The interleaving that left a restarted gossip node without keys: the start reads the
    /// (old) settings, the change stores new ones and gives them, then the start gives what
    /// it read. The change must win.
    #[test]
    fn a_change_during_a_publish_is_what_the_component_keeps() {
        let settings = Arc::new(Mutex::new(0u32));
        let slot = Arc::new(Latest::<Component>::default());
        let comp = Component::default();
        let (read_tx, read_rx) = mpsc::channel();
        let starter = {
            let (settings, slot, comp) = (settings.clone(), slot.clone(), comp.clone());
            std::thread::spawn(move || {
                slot.publish(comp, |c| {
                    let old = *settings.lock().unwrap();
                    read_tx.send(()).unwrap();
                    // The change runs now (or tries to).
                    std::thread::sleep(Duration::from_millis(100));
                    c.0.store(old, Ordering::SeqCst);
                });
            })
        };
        read_rx.recv().unwrap();
        *settings.lock().unwrap() = 7;
        slot.update(|c| c.0.store(*settings.lock().unwrap(), Ordering::SeqCst));
        starter.join().unwrap();
        assert_eq!(comp.0.load(Ordering::SeqCst), 7);
        assert_eq!(slot.get().map(|c| c.0.load(Ordering::SeqCst)), Some(7));
    }

    #[test]
    fn nothing_is_given_before_a_publish_or_after_a_take() {
        let slot = Latest::<Component>::default();
        let mut calls = 0;
        slot.update(|_| calls += 1);
        assert_eq!(calls, 0);
        slot.publish(Component::default(), |_| calls += 1);
        slot.update(|_| calls += 1);
        assert!(slot.take().is_some());
        slot.update(|_| calls += 1);
        assert_eq!(calls, 2);
        assert!(slot.get().is_none());
    }
}
