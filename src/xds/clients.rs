//! The registry of connected ADS clients, for the debug service.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::connection::{Connection, TypeState};

#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub node_id: String,
    pub peer: Option<SocketAddr>,
    pub connected_at: SystemTime,
    pub types: BTreeMap<String, TypeState>,
}

#[derive(Debug, Clone, Default)]
pub struct Clients {
    inner: Arc<Mutex<ClientsInner>>,
}

#[derive(Debug, Default)]
struct ClientsInner {
    next_id: u64,
    clients: BTreeMap<u64, ClientInfo>,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClientsInner> {
        // The map stays consistent even if a holder panicked: every write is a single insert or remove.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new stream; returns its key.
    pub fn connect(&self, peer: Option<SocketAddr>) -> u64 {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        let info = ClientInfo {
            node_id: String::new(),
            peer,
            connected_at: SystemTime::now(),
            types: BTreeMap::new(),
        };
        inner.clients.insert(id, info);
        id
    }

    pub fn update(&self, id: u64, connection: &Connection) {
        if let Some(info) = self.lock().clients.get_mut(&id) {
            info.node_id = connection.node_id().unwrap_or_default().to_owned();
            info.types.clone_from(connection.types());
        }
    }

    pub fn disconnect(&self, id: u64) {
        self.lock().clients.remove(&id);
    }

    pub fn list(&self) -> Vec<ClientInfo> {
        self.lock().clients.values().cloned().collect()
    }
}
