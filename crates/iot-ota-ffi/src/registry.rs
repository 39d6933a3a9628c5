//! Registries of live handles: how a handle from C is checked without being
//! dereferenced.
//!
//! A handle given to C is the address of an `Arc`'s contents, and the `Arc`
//! itself stays here until the handle is destroyed. Looking a handle up is a
//! search by address: a NULL, stale, foreign or wrong-type pointer is simply
//! absent. The lists are short (a device has one or a few instances), so a
//! linear search under a mutex is plenty.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use crate::lock;

/// The live handles of one type.
pub(crate) struct Registry<T> {
    live: Mutex<Vec<Arc<T>>>,
}

impl<T> Registry<T> {
    /// An empty registry (usable in a `static`).
    pub(crate) const fn new() -> Self {
        Registry {
            live: Mutex::new(Vec::new()),
        }
    }

    /// Registers `value`; returns its handle for C.
    pub(crate) fn insert(&self, value: Arc<T>) -> *mut c_void {
        let handle = Arc::as_ptr(&value) as *mut c_void;
        lock(&self.live).push(value);
        handle
    }

    /// The object behind `handle`, if it is live.
    pub(crate) fn get(&self, handle: *const c_void) -> Option<Arc<T>> {
        if handle.is_null() {
            return None;
        }
        lock(&self.live)
            .iter()
            .find(|v| Arc::as_ptr(v) as *const c_void == handle)
            .cloned()
    }

    /// Unregisters `handle`; returns its object (dropped by the caller, outside the lock).
    pub(crate) fn remove(&self, handle: *const c_void) -> Option<Arc<T>> {
        if handle.is_null() {
            return None;
        }
        let mut live = lock(&self.live);
        let i = live
            .iter()
            .position(|v| Arc::as_ptr(v) as *const c_void == handle)?;
        let value = live.swap_remove(i);
        if live.is_empty() {
            // Free the list's buffer too, so a program that destroyed all its
            // handles holds no memory of ours.
            *live = Vec::new();
        }
        Some(value)
    }

    /// Whether any live object satisfies `pred`.
    pub(crate) fn any(&self, pred: impl Fn(&T) -> bool) -> bool {
        lock(&self.live).iter().any(|v| pred(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_by_address() {
        let r: Registry<u32> = Registry::new();
        let a = r.insert(Arc::new(1));
        let b = r.insert(Arc::new(2));
        assert_eq!(r.get(a).as_deref(), Some(&1));
        assert_eq!(r.get(b).as_deref(), Some(&2));
        assert!(r.get(std::ptr::null()).is_none());
        let x = 5u32;
        assert!(r.get(&x as *const u32 as *const c_void).is_none());
        assert_eq!(r.remove(a).as_deref(), Some(&1));
        assert!(r.get(a).is_none(), "a destroyed handle is stale");
        assert!(r.remove(a).is_none());
        assert!(r.any(|v| *v == 2));
        assert!(!r.any(|v| *v == 1));
    }
}
