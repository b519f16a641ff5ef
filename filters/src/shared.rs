//! State filters share across VMs and threads: shared data (key → bytes with a CAS counter)
//! and shared queues, both scoped by VM id as in Envoy.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::abi::Status;

/// Who is told when a queue gets data: a root context on one thread's VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueOwner {
    pub thread: usize,
    pub chain: u64,
    pub filter: usize,
    pub root_context: u32,
}

struct Queue {
    vm_id: String,
    name: String,
    owner: QueueOwner,
    items: VecDeque<Vec<u8>>,
}

/// (VM id, key) → (value, CAS).
type Entries = HashMap<(String, String), (Vec<u8>, u32)>;

#[derive(Default)]
pub struct Shared {
    data: Mutex<Entries>,
    queues: Mutex<Vec<Queue>>,
}

/// Bounds that keep one filter from growing shared state without limit.
const MAX_QUEUE_ITEMS: usize = 10_000;

impl Shared {
    pub fn get(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        let data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        data.get(&(vm_id.to_owned(), key.to_owned())).cloned()
    }

    /// Sets `key`; with `cas != 0` only if the entry's CAS is still `cas`.
    pub fn set(&self, vm_id: &str, key: &str, value: Vec<u8>, cas: u32) -> Status {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let entry = data
            .entry((vm_id.to_owned(), key.to_owned()))
            .or_insert_with(|| (Vec::new(), 0));
        if cas != 0 && cas != entry.1 {
            return Status::CasMismatch;
        }
        entry.0 = value;
        entry.1 = entry.1.wrapping_add(1).max(1);
        Status::Ok
    }

    /// Registers (or re-registers, moving its owner) a queue; returns its id.
    pub fn register_queue(&self, vm_id: &str, name: &str, owner: QueueOwner) -> u32 {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
        {
            queues[i].owner = owner;
            return i as u32 + 1;
        }
        queues.push(Queue {
            vm_id: vm_id.to_owned(),
            name: name.to_owned(),
            owner,
            items: VecDeque::new(),
        });
        queues.len() as u32
    }

    pub fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
            .map(|i| i as u32 + 1)
    }

    /// Appends to queue `id`; returns whom to notify.
    pub fn enqueue(&self, id: u32, value: Vec<u8>) -> Result<QueueOwner, Status> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let q = queues
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        if q.items.len() >= MAX_QUEUE_ITEMS {
            return Err(Status::InternalFailure);
        }
        q.items.push_back(value);
        Ok(q.owner.clone())
    }

    pub fn dequeue(&self, id: u32) -> Result<Vec<u8>, Status> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let q = queues
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        q.items.pop_front().ok_or(Status::Empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rejects_stale_writers() {
        let s = Shared::default();
        assert_eq!(s.get("vm", "k"), None);
        assert_eq!(s.set("vm", "k", b"1".to_vec(), 0), Status::Ok);
        let (_, cas) = s.get("vm", "k").unwrap();
        assert_eq!(s.set("vm", "k", b"2".to_vec(), cas), Status::Ok);
        assert_eq!(s.set("vm", "k", b"3".to_vec(), cas), Status::CasMismatch);
        assert_eq!(s.get("vm", "k").unwrap().0, b"2");
        assert_eq!(s.get("other-vm", "k"), None);
    }

    #[test]
    fn queues_resolve_by_vm_and_name_and_drain_in_order() {
        let s = Shared::default();
        let owner = QueueOwner {
            thread: 0,
            chain: 1,
            filter: 0,
            root_context: 1,
        };
        let id = s.register_queue("vm", "q", owner.clone());
        assert_eq!(s.resolve_queue("vm", "q"), Some(id));
        assert_eq!(s.resolve_queue("vm", "other"), None);
        assert_eq!(s.dequeue(id), Err(Status::Empty));
        assert_eq!(s.enqueue(id, b"a".to_vec()), Ok(owner));
        s.enqueue(id, b"b".to_vec()).unwrap();
        assert_eq!(s.dequeue(id).unwrap(), b"a");
        assert_eq!(s.dequeue(id).unwrap(), b"b");
        assert_eq!(s.enqueue(99, vec![]), Err(Status::NotFound));
    }
}
