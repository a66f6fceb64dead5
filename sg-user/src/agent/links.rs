//! Following interfaces over rtnetlink: a dump of name → ifindex, and a wake-up on every link
//! event (created, deleted, renamed, moved). The agent re-reads the whole table on a wake-up
//! instead of interpreting each event: renames and ifindex reuse then need no special case.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_route::{RouteNetlinkMessage, link::LinkAttribute};
use rtnetlink::{Handle, MulticastGroup, new_multicast_connection};

use crate::netns;

type Events = UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
)>;

pub struct Links {
    handle: Handle,
    events: Events,
}

impl Links {
    /// Opens a netlink connection subscribed to link events in netns `ns` (or the current
    /// one). The socket is created inside the namespace and stays bound to it. Must be called
    /// from within a tokio runtime.
    pub fn open(ns: Option<&str>) -> Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, events) = netns::run_in(ns, move || {
            let _guard = rt.enter();
            new_multicast_connection(&[MulticastGroup::Link])
        })?
        .context("opening an rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle, events })
    }

    /// Every interface: name → ifindex.
    pub async fn dump(&self) -> Result<BTreeMap<String, u32>> {
        let mut out = BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links.try_next().await.context("rtnetlink link dump")? {
            let index = msg.header.index;
            for attr in msg.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    out.insert(name, index);
                }
            }
        }
        Ok(out)
    }

    /// Takes the events already queued (the caller is about to re-read the whole table) and
    /// returns the ifindexes deleted among them.
    pub fn drain(&mut self) -> Vec<u32> {
        let mut deleted = Vec::new();
        while let Ok(Some((msg, _))) = self.events.try_recv().map(Some) {
            if let Some(i) = deleted_index(&msg) {
                deleted.push(i);
            }
        }
        deleted
    }

    /// Waits for the next link event and returns the ifindexes it deleted (possibly none).
    /// A deleted ifindex matters even if the same name and index reappear before the table is
    /// read again: the tcx links died with the old device. `None` when the connection is gone.
    pub async fn changed(&mut self) -> Option<Vec<u32>> {
        loop {
            let (msg, _) = self.events.next().await?;
            match &msg.payload {
                netlink_packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(_)) => {
                    return Some(Vec::new());
                }
                netlink_packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(_)) => {
                    return Some(deleted_index(&msg).into_iter().collect());
                }
                _ => {}
            }
        }
    }
}

fn deleted_index(msg: &netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>) -> Option<u32> {
    match &msg.payload {
        netlink_packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
            Some(l.header.index)
        }
        _ => None,
    }
}
